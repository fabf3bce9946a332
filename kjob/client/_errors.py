"""What the client raises: one exception per kind of failure, each carrying the server's message.

    ApiError (kjob.errors.KjobError)       status (None: no answer), message, field
    ├── InvalidInput (kjob.errors.InvalidInput)   422/400/413, or refused in this process
    │                                             before sending; `field` names the input
    ├── Unauthorized                       401: no token, or one that is not valid
    ├── Forbidden                          403: the token's role is too low
    ├── NotFound (LookupError)             404: no such job, run, token or secret in your tenant
    ├── Conflict                           409: e.g. a slug that is already taken
    │   └── QuotaExceeded                  409: a tenant quota (jobs, concurrent runs) is reached
    │       └── RateLimited                429: run-now beyond its rate; `retry_after_s`
    └── ServerUnavailable                  503, or no answer at all (connection refused, timeout)
WaitTimedOut (kjob.errors.KjobError, TimeoutError)   `runs.wait` gave up; the run goes on

Because InvalidInput is also `kjob.errors.InvalidInput`, `except kjob.client.InvalidInput`
catches a bad job whether this process or the server refused it, with the same field name.
Answers become exceptions in one place: `error_for`.
"""

from __future__ import annotations

from typing import Any

import httpx

from kjob import errors
from kjob.client._config import Target


class ApiError(errors.KjobError):
    """The API refused a request or did not answer. `status` is the HTTP status (None when no
    answer came), `message` the server's words, `field` the input at fault if it names one."""

    def __init__(self, message: str, field: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidInput(ApiError, errors.InvalidInput):
    """Bad input, refused by the server or, before sending, by the same model in this process."""

    def __init__(self, message: str, field: str | None = None, status: int | None = None) -> None:
        ApiError.__init__(self, message, field, status)


class Unauthorized(ApiError):
    pass


class Forbidden(ApiError):
    pass


class NotFound(ApiError, LookupError):
    pass


class Conflict(ApiError):
    pass


class QuotaExceeded(Conflict):
    pass


class RateLimited(QuotaExceeded):
    def __init__(self, message: str, field: str | None = None, status: int | None = None,
                 retry_after_s: float = 1.0) -> None:
        super().__init__(message, field, status)
        self.retry_after_s = retry_after_s


class ServerUnavailable(ApiError):
    pass


class WaitTimedOut(errors.KjobError, TimeoutError):
    """`runs.wait` gave up before the run ended; `run` is how it was last seen."""

    def __init__(self, message: str, run: Any) -> None:
        super().__init__(message)
        self.run = run


#: The server's `kind` (kjob.gateway.errors) first; the status for answers without one.
_BY_KIND: dict[str, type[ApiError]] = {
    "invalid_input": InvalidInput, "unauthorized": Unauthorized, "forbidden": Forbidden,
    "not_found": NotFound, "conflict": Conflict, "quota_exceeded": QuotaExceeded,
    "rate_limited": RateLimited, "unavailable": ServerUnavailable,
}
_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidInput, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: InvalidInput,
    422: InvalidInput, 429: RateLimited, 502: ServerUnavailable, 503: ServerUnavailable, 504: ServerUnavailable,
}


def error_for(response: httpx.Response, target: Target) -> ApiError:
    """The exception for an error answer (status >= 400)."""
    status = response.status_code
    try:
        err = response.json()["error"]
        message, field, kind = str(err["message"]), err.get("field"), err.get("kind")
    except (ValueError, KeyError, TypeError):
        message, field, kind = f"HTTP {status} from {target.url}: {response.text[:200]}", None, None
    cls = _BY_KIND.get(kind or "") or _BY_STATUS.get(status, ApiError)
    if status == 401:
        message = (f"{message} (token from {target.token_source})" if target.token is not None
                   else f"no API token: set KJOB_TOKEN or run `kjob up`, which writes {target.token_source}")
    if cls is RateLimited:
        retry_after = response.headers.get("Retry-After", "1")
        return RateLimited(message, field, status, float(retry_after) if retry_after.isdigit() else 1.0)
    return cls(message, field, status)


def unreachable(url: str, err: httpx.TransportError) -> ServerUnavailable:
    if isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout)):
        return ServerUnavailable(f"cannot reach the kjob API at {url}: start it with `kjob up` or set KJOB_API_URL")
    return ServerUnavailable(f"the kjob API at {url} did not answer ({type(err).__name__}: {err}); try again")
