"""`/v1/quotas`: the caller's tenant's limits and what it uses of them now."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from kjob._time import utcnow
from kjob.gateway.auth import Viewer, gateway_state
from kjob.gateway.state import GatewayState
from kjob.model.views import QuotaLimits, QuotaUsage, QuotaView
from kjob.store.quotas import usage
from kjob.store.usage import UsageStore

router = APIRouter(tags=["quotas"])
State = Annotated[GatewayState, Depends(gateway_state)]





@router.get("/quotas", response_model=QuotaView)
async def quotas(principal: Viewer, state: State) -> QuotaView:
    assert state.quotas is not None, "create_app wires the quotas"
    limits = state.quotas.limits(principal.tenant)
    return QuotaView(
        tenant=principal.tenant,
        limits=QuotaLimits(
            max_jobs=limits.max_jobs,
            max_concurrent_runs=limits.max_concurrent_runs,
            min_interval_s=limits.min_interval.total_seconds(),
            run_now_per_minute=limits.run_now_per_minute,
            max_cost_usd_per_day=limits.max_cost_usd_per_day,
        ),
        usage=QuotaUsage(**await usage(state.engine, principal.tenant), cost_usd_today=await UsageStore(
            state.engine).tenant_cost_since(principal.tenant, utcnow().replace(
                hour=0, minute=0, second=0, microsecond=0))),
    )
