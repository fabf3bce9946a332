"""Probes for process supervisors and load balancers. No token: they reveal nothing."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from sqlalchemy import text

from kjob.errors import ServerError
from kjob.gateway.auth import gateway_state
from kjob.gateway.state import GatewayState

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive and serving."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: Annotated[GatewayState, Depends(gateway_state)]) -> dict[str, str]:
    """The database answers. 503 when it does not, so a load balancer stops sending traffic."""
    try:
        async with state.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as e:  # any failure to answer means "not ready"; the message says which
        raise ServerError(f"the database does not answer: {type(e).__name__}: {e}") from None
    return {"status": "ready"}
