"""`/v1/secrets`: the tenant's secrets, which jobs reference from `sandbox.env` as
`"secret:<name>"` (kjob.store.secrets). Values go in and never come out: no route answers one.
Setting and deleting needs editor (secrets are part of a job's configuration); listing the
names needs viewer.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response, status
from pydantic import BaseModel, ConfigDict, Field

from kjob.gateway.auth import Editor, Viewer, actor_of, gateway_state
from kjob.gateway.state import GatewayState
from kjob.model.views import SecretView
from kjob.store.secrets import SecretStore

router = APIRouter(tags=["secrets"])
State = Annotated[GatewayState, Depends(gateway_state)]


class SecretValue(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: str = Field(description="the secret; at most 64 KiB, not empty")



def _store(state: GatewayState) -> SecretStore:
    assert state.secrets is not None, "create_app wires the secret store"
    return state.secrets


@router.put("/secrets/{name}", response_model=SecretView,
            responses={201: {"model": SecretView, "description": "created"}})
async def set_secret(name: str, body: SecretValue, principal: Editor, state: State, response: Response) -> SecretView:
    """Create or replace a secret: 201 when created, 200 when replaced. 503 without a secret key."""
    info, created = await _store(state).set(actor_of(principal), name, body.value)
    if created:
        response.status_code = status.HTTP_201_CREATED
    return SecretView(**vars(info))


@router.get("/secrets", response_model=list[SecretView])
async def list_secrets(principal: Viewer, state: State) -> list[SecretView]:
    """The tenant's secrets by name (names only)."""
    return [SecretView(**vars(s)) for s in await _store(state).list(principal.tenant)]


@router.delete("/secrets/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_secret(name: str, principal: Editor, state: State) -> Response:
    """Delete a secret; 409 while jobs reference it (they are named)."""
    await _store(state).delete(actor_of(principal), name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
