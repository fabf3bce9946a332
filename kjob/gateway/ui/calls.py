"""How the dashboard uses the /v1 API: it calls the /v1 route handlers themselves.

`call(handler, principal, state, ...)` first runs the role check the handler declares in its
own signature (`principal: Operator` is `Depends(require("operator"))`: the very function
FastAPI runs for /v1), then the handler with the session's principal. So a page or an action
can do exactly what the same token could do with `curl` on /v1, in the same tenant, with the
same validation, quotas, audit rows and job-changed announcements, and no more: there is no
second implementation of any rule to drift. `allowed(handler, principal)` reads the same
declared role to decide which buttons a page shows.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any, TypeVar

from kjob.gateway.auth import ROLE_ATTRIBUTE
from kjob.gateway.state import GatewayState
from kjob.store.tokens import Principal

T = TypeVar("T")


@cache
def _role_check(handler: Callable[..., Any]) -> Callable[[Principal], Awaitable[Principal]]:
    """The `require(role)` check of the handler's `principal` parameter."""
    hint = typing.get_type_hints(handler, include_extras=True)["principal"]
    for meta in getattr(hint, "__metadata__", ()):
        check = getattr(meta, "dependency", None)
        if check is not None and getattr(check, ROLE_ATTRIBUTE, None):
            return check
    raise TypeError(f"{handler.__qualname__} declares no role; every /v1 handler must")


@cache
def _takes_state(handler: Callable[..., Any]) -> bool:
    return "state" in inspect.signature(handler).parameters


def role_of(handler: Callable[..., Any]) -> str:
    return getattr(_role_check(handler), ROLE_ATTRIBUTE)


def allowed(handler: Callable[..., Any], principal: Principal) -> bool:
    return principal.allows(role_of(handler))


async def call(handler: Callable[..., Awaitable[T]], principal: Principal, state: GatewayState, **kwargs: Any) -> T:
    """Run a /v1 handler for the session's principal.

    :raises Forbidden: the principal's role is below the handler's (the /v1 message).
    :raises KjobError: whatever the handler raises (NotFound for another tenant's job or run).
    """
    checked = await _role_check(handler)(principal)
    if _takes_state(handler):
        kwargs["state"] = state
    return await handler(principal=checked, **kwargs)
