"""Which run the current task handles: the fields log lines and spans are stamped with.

Its own module so that `logging` (which stamps records) and `tracing` (which binds the run a
message carries) both import it and neither imports the other's internals at call time.

asyncio copies the context into every task it creates, so the fields follow a run into the
tasks it starts and never leak into another run's task.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from types import MappingProxyType
from typing import Mapping

#: The run the current task handles: any of tenant, job, run_id.
_run: ContextVar[dict[str, str] | None] = ContextVar("kjob_run", default=None)
_NONE: Mapping[str, str] = MappingProxyType({})


def bind(*, tenant: str | None = None, job: str | None = None, run_id: str | None = None) -> Token:
    """Add run fields to the current context (fields given as None are left as they are).
    Returns a token for `reset`; a task that ends need not reset."""
    fields = dict(_run.get() or {})
    for key, value in (("tenant", tenant), ("job", job), ("run_id", run_id)):
        if value is not None:
            fields[key] = value
    return _run.set(fields)


def reset(token: Token) -> None:
    _run.reset(token)


def current() -> Mapping[str, str]:
    """The run fields of the current context. Not a copy (it is read on every log record):
    `bind` never changes a mapping it has set, it sets a new one."""
    return _run.get() or _NONE
