"""`GET /v1/status`: the cluster as one node sees it: nodes, the ticker leader, stream health."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from kjob._time import utcnow
from kjob.bus import presence
from kjob.bus.setup import stream_info
from kjob.gateway.auth import Viewer, gateway_state
from kjob.gateway.state import GatewayState
from kjob.ticker.leader import current_leader

router = APIRouter(tags=["status"])
State = Annotated[GatewayState, Depends(gateway_state)]


@router.get("/status")
async def status(principal: Viewer, state: State) -> dict[str, Any]:
    """Nodes heard from in the last seconds (roles, sandboxes), the ticker leader and its lease
    age, and each stream's messages and consumer backlog. Cluster-wide facts, no tenant data."""
    if state.js is None:
        return {"nodes": [], "leader": None, "streams": {}, "bus": "not connected"}
    lease = await current_leader(state.js)
    leader = None
    if lease is not None:
        renewed = datetime.fromisoformat(lease.renewed)
        leader = {"node": lease.node, "revision": lease.revision, "since": lease.since,
                  "lease_age_s": round((utcnow() - renewed).total_seconds(), 3)}
    return {"nodes": await presence.nodes(state.js), "leader": leader, "streams": await stream_info(state.js)}
