"""Bearer-token authentication and role checks.

Every `/v1` route depends on `authenticate` (set on the router, so no route can forget it);
each route then states the least role it needs with `require(...)`. The tenant of every
request is the token's: nothing a client sends can choose another tenant (invariant 5).

Roles, each including the ones before it: viewer (read) < operator (enable/disable)
< editor (create, change, delete) < admin.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kjob.errors import Forbidden, Unauthorized
from kjob.gateway.state import GatewayState
from kjob.store.audit import Actor
from kjob.store.tokens import ROLES, Principal

_bearer = HTTPBearer(
    auto_error=False, description="an API token; `kjob up` writes an admin token to $KJOB_HOME/admin.token"
)


def gateway_state(request: Request) -> GatewayState:
    return request.app.state.gateway


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The principal of the request's bearer token.

    :raises Unauthorized: no `Authorization: Bearer` header, or a token that is unknown or revoked.
    """
    if credentials is None or not credentials.credentials:
        raise Unauthorized(
            "missing bearer token: send 'Authorization: Bearer <token>' "
            "(`kjob up` writes an admin token to $KJOB_HOME/admin.token)"
        )
    principal = await gateway_state(request).tokens.verify(credentials.credentials)
    if principal is None:
        raise Unauthorized("the bearer token is not valid (unknown or revoked); use a current API token")
    return principal


def require(role: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency that yields the principal if its role is `role` or higher, else Forbidden."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")

    async def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not principal.allows(role):
            raise Forbidden(f"the token's role {principal.role!r} cannot do this; it needs {role!r} or higher")
        return principal

    return check


def actor_of(principal: Principal) -> Actor:
    """Who the audit log names for a write made with this principal's token."""
    return Actor(subject=f"token:{principal.token_id}", token_id=principal.token_id, tenant=principal.tenant)


Viewer = Annotated[Principal, Depends(require("viewer"))]
Operator = Annotated[Principal, Depends(require("operator"))]
Editor = Annotated[Principal, Depends(require("editor"))]
