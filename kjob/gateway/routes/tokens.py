"""`/v1/tokens`: create, list and revoke API tokens (admin only).

An admin manages its own tenant's tokens; an admin of the admin tenant (`KJOB_ADMIN_TENANT`,
default `default`) may name another tenant (`tenant` in the body or the query). Each create and
revoke is in the audit log of the token's tenant. A token's secret is answered once, on create.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field

from kjob.gateway.auth import Admin, actor_of, gateway_state, managed_tenant
from kjob.gateway.state import GatewayState
from kjob.model.views import NewToken, Role, TokenView

router = APIRouter(tags=["tokens"])
State = Annotated[GatewayState, Depends(gateway_state)]

TenantQuery = Annotated[
    str | None, Query(description="another tenant (admins of the admin tenant only); default: your own")
]


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    name: str = Field(default="", max_length=128, description="a note for people, e.g. 'ci deploys'")
    tenant: str | None = Field(default=None, description="another tenant (admins of the admin tenant only)")




@router.post("/tokens", status_code=status.HTTP_201_CREATED, response_model=NewToken)
async def create_token(request: TokenRequest, principal: Admin, state: State) -> NewToken:
    """Create a token; the answer holds its secret, which cannot be read again."""
    tenant = managed_tenant(principal, state, request.tenant)
    token_id, secret = await state.tokens.create(tenant, request.role, request.name, actor=actor_of(principal))
    return NewToken(**vars(await state.tokens.get(tenant, token_id)), secret=secret)


@router.get("/tokens", response_model=list[TokenView])
async def list_tokens(principal: Admin, state: State, tenant: TenantQuery = None) -> list[TokenView]:
    """The tenant's tokens, revoked ones included, oldest first."""
    return [TokenView(**vars(t)) for t in await state.tokens.list(managed_tenant(principal, state, tenant))]


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
async def revoke_token(token_id: str, principal: Admin, state: State, tenant: TenantQuery = None) -> Response:
    """Revoke a token at once: the next request with it is refused. Revoking twice is a no-op."""
    await state.tokens.revoke(managed_tenant(principal, state, tenant), token_id, actor=actor_of(principal))
    return Response(status_code=status.HTTP_204_NO_CONTENT)
