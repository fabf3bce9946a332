"""Bearer-token authentication and role checks.

Every `/v1` route depends on `authenticate` (set on the router, so no route can forget it);
each route then states the least role it needs with `require(...)` (a test checks that every
route does). The tenant of every request is the token's: nothing a client sends can choose
another tenant (invariant 5), except that an admin of the admin tenant (`KJOB_ADMIN_TENANT`,
default `default`, the tenant of `kjob up`'s token) may manage other tenants' tokens.

Two kinds of bearer token are accepted:
- kjob's own API tokens (`kjob_<id>_<secret>`, kjob.store.tokens), made by `kjob token create`
  and by `kjob up`;
- OpenID Connect JWTs of the configured issuer (kjob.gateway.oidc), when `KJOB_OIDC_ISSUER` is set.

Roles, each including the ones before it: viewer (read) < operator (run-now, enable, disable)
< editor (create, change, delete jobs; set and delete secrets) < admin (tokens).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kjob.errors import Forbidden, Unauthorized
from kjob.gateway.oidc import OidcConfig, OidcVerifier, looks_like_jwt
from kjob.gateway.state import GatewayState
from kjob.store.audit import Actor
from kjob.store.quotas import Quotas
from kjob.store.secrets import SecretBox, SecretStore
from kjob.store.tokens import ROLES, Principal, check_tenant

_bearer = HTTPBearer(
    auto_error=False,
    description="a kjob API token (`kjob token create`; `kjob up` writes an admin token to "
    "$KJOB_HOME/admin.token), or a JWT of the configured OpenID Connect issuer",
)

#: The attribute `require` sets on its checks, so a test can find the role of every route.
ROLE_ATTRIBUTE = "kjob_role"


def gateway_state(request: Request) -> GatewayState:
    return request.app.state.gateway


def wire_security(state: GatewayState) -> None:
    """Fill in the security collaborators the caller did not give, from `state.settings`:
    the OIDC verifier (when an issuer is configured), the secret store and the quotas.

    :raises InvalidInput: OIDC or secret-key settings that cannot work (names the setting).
    """
    if state.oidc is None:
        config = OidcConfig.from_settings(state.settings)
        if config is not None:
            state.oidc = OidcVerifier(config)
    if state.secrets is None:
        state.secrets = SecretStore(state.engine, SecretBox.from_settings(state.settings))
    if state.quotas is None:
        state.quotas = Quotas(state.settings.quotas)


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The principal of the request's bearer token.

    :raises Unauthorized: no `Authorization: Bearer` header, or a token that is not valid
        (unknown, revoked, or a JWT that fails verification: the message says why).
    :raises Forbidden: a valid JWT without a usable tenant or kjob role.
    """
    if credentials is None or not credentials.credentials:
        raise Unauthorized(
            "missing bearer token: send 'Authorization: Bearer <token>' "
            "(`kjob up` writes an admin token to $KJOB_HOME/admin.token)"
        )
    return await principal_of_token(gateway_state(request), credentials.credentials)


async def principal_of_token(state: GatewayState, token: str) -> Principal:
    """The principal of a bearer token, however it reached the gateway: the `Authorization`
    header of /v1, or the dashboard's session cookie (kjob.gateway.ui.session), so both follow
    one rule and a revoked token ends a browser session at its next request.

    :raises Unauthorized: unknown or revoked token, or a JWT that fails verification.
    :raises Forbidden: a valid JWT without a usable tenant or kjob role.
    """
    if state.oidc is not None and looks_like_jwt(token):
        return await state.oidc.verify(token)
    principal = await state.tokens.verify(token)
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

    setattr(check, ROLE_ATTRIBUTE, role)
    return check


def actor_of(principal: Principal) -> Actor:
    """Who the audit log names for a write made with this principal's token."""
    return Actor(subject=principal.who, token_id=principal.token_id, tenant=principal.tenant)


def managed_tenant(principal: Principal, state: GatewayState, tenant: str | None) -> str:
    """The tenant whose tokens an admin manages: its own, unless it asks for another and is an
    admin of the admin tenant.

    :raises InvalidInput: `tenant` is not a tenant name.
    :raises Forbidden: another tenant, asked by an admin of any other tenant.
    """
    if tenant is None or tenant == principal.tenant:
        return principal.tenant
    check_tenant(tenant)
    admin_tenant = state.settings.admin_tenant
    if not admin_tenant or principal.tenant != admin_tenant:
        raise Forbidden(
            f"an admin of tenant {principal.tenant!r} manages only that tenant's tokens; "
            f"tokens of {tenant!r} are managed by its own admins"
            + (f" or by an admin of tenant {admin_tenant!r}" if admin_tenant else "")
        )
    return tenant


Viewer = Annotated[Principal, Depends(require("viewer"))]
Operator = Annotated[Principal, Depends(require("operator"))]
Editor = Annotated[Principal, Depends(require("editor"))]
Admin = Annotated[Principal, Depends(require("admin"))]
