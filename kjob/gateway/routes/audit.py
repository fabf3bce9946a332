"""`/v1/audit`: who changed what in the caller's tenant, newest first.

Readable by viewers: every row is about the tenant's own jobs, runs, tokens and secrets, and
none holds a secret (token secrets and secret values are never recorded), while "who changed
this job?" is what anyone looking after a job needs to answer.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from kjob.gateway.auth import Viewer, gateway_state
from kjob.gateway.state import GatewayState
from kjob.model.job import SLUG_PATTERN
from kjob.model.views import AuditView
from kjob.store.audit import list_audit

router = APIRouter(tags=["audit"])
State = Annotated[GatewayState, Depends(gateway_state)]



@router.get("/audit", response_model=list[AuditView])
async def audit(
    principal: Viewer,
    state: State,
    slug: Annotated[str | None, Query(pattern=SLUG_PATTERN, description="only rows about this job")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditView]:
    """The tenant's audit log, newest first."""
    target = f"job/{slug}" if slug is not None else None
    return [AuditView(**vars(e)) for e in await list_audit(state.engine, principal.tenant, target=target, limit=limit)]
