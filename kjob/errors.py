"""The exceptions kjob raises, in one tree.

    KjobError
    ├── InvalidInput (ValueError)        bad user input; carries the field it names
    │   ├── ScheduleError                a schedule expression or time zone that cannot fire
    │   └── JobFileError                 a job file that is not valid TOML or not a job
    ├── NotFound (LookupError)           a job or run that does not exist for this tenant
    ├── Conflict                         e.g. a slug that is already taken
    │   └── QuotaExceeded                a tenant's limit (jobs, concurrent runs) is reached
    ├── RateLimited                      too many requests of one kind; carries when to retry
    ├── Unauthorized / Forbidden         missing or wrong credentials / role too low
    ├── ServerError                      an embedded or external server would not start or answer
    └── RelayError                       a delivery to Relay failed
        ├── RelayRejected                4xx: never retried
        └── RelayUnavailable             connection error, timeout or 5xx: retried with backoff

The gateway maps each one to an HTTP status in exactly one place (`kjob.gateway.errors`),
and the CLI prints `error: <message>` and exits non-zero.
"""

from __future__ import annotations


class KjobError(Exception):
    """Base of every error kjob raises on purpose."""


class InvalidInput(KjobError, ValueError):
    """Input that kjob refuses. `field` names the offending field (dotted for nested)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class ScheduleError(InvalidInput):
    """A schedule expression, time zone or instant that cannot be used."""


class JobFileError(InvalidInput):
    """A job file that cannot be read as jobs."""


class NotFound(KjobError, LookupError):
    def __init__(self, kind: str, key: str) -> None:
        super().__init__(f"no {kind} named {key!r} was found")
        self.kind = kind
        self.key = key


class Conflict(KjobError):
    """The request conflicts with what is stored (a slug already taken, a run already final)."""


class QuotaExceeded(Conflict):
    """A tenant's quota would be exceeded (docs/security.md); the message names the quota."""


class RateLimited(KjobError):
    """Too many requests of one kind in a window; `retry_after_s` says when one fits again."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthorized(KjobError):
    """No credentials, or credentials that are not valid."""


class Forbidden(KjobError):
    """Valid credentials whose role does not allow the action."""


class ServerError(KjobError):
    """A server kjob depends on (NATS, PostgreSQL, Docker) could not be started or reached."""


class RelayError(KjobError):
    """A dispatch to Relay (or a webhook) did not succeed."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class RelayRejected(RelayError):
    """The receiver answered 4xx: the request itself is wrong, so retrying cannot help."""


class RelayUnavailable(RelayError):
    """Connection error, timeout or 5xx: worth retrying later."""
