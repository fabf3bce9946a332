"""`POST /v1/jobs/{slug}/backfill`: run the job's slots of a past range.

Each slot becomes a run with trigger `backfill` and the slot's own run key, so a slot the ledger
already holds (run, missed, skipped or backfilled before) is not run again. The runs start under
the job's overlap policy, or the one the request names: under `skip` (the default policy) a
slot that finds another run going is recorded `skipped`, so a range usually wants `queue`
(one after another, in slot order) or `allow` (all at once).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, status
from pydantic import BaseModel, ConfigDict, Field

from kjob._time import utcnow
from kjob.errors import ServerError
from kjob.gateway.auth import Operator, actor_of, gateway_state
from kjob.gateway.routes.runs import slot_ledger
from kjob.gateway.state import GatewayState
from kjob.model.policies import OverlapPolicy, backfill_slots
from kjob.model.run import Run
from kjob.model.schedule import Schedule
from kjob.model.views import BackfillResult

log = logging.getLogger(__name__)

router = APIRouter(tags=["runs"])
State = Annotated[GatewayState, Depends(gateway_state)]

#: Due messages published at once for one request.
PUBLISH_CONCURRENCY = 64


class BackfillRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # Plain datetimes: a naive one is refused by `backfill_slots`, with a message saying what to write.
    start: datetime = Field(alias="from", description="first instant of the range (included), with Z or an offset")
    end: datetime = Field(alias="to", description="last instant of the range (included); must be in the past")
    overlap: OverlapPolicy | None = Field(
        default=None, description="overlap policy for these runs; the job's own when unset"
    )



@router.post("/jobs/{slug}/backfill", status_code=status.HTTP_202_ACCEPTED, response_model=BackfillResult)
async def backfill(slug: str, body: BackfillRequest, principal: Operator, state: State) -> BackfillResult:
    """Run the job's slots from `from` to `to` (both included; at most 1000 per request), also
    when the job is disabled. 422 naming `from` or `to` for a bad range."""
    ledger = slot_ledger(state)
    job = await state.jobs.get(principal.tenant, slug)
    if state.publish_due is None:
        raise ServerError("this gateway cannot start runs: it runs without a bus")
    slots = backfill_slots(Schedule.parse(job.schedule), job.timezone, body.start, body.end, utcnow())
    runs, existing = await ledger.record_backfill(job, slots, overlap=body.overlap, actor=actor_of(principal))
    await _publish(state, runs)
    return BackfillResult(slots=len(slots), queued=len(runs), existing=existing, overlap=body.overlap or job.overlap,
                          run_ids=[r.id for r in runs])


async def _publish(state: GatewayState, runs: list[Run]) -> None:
    assert state.publish_due is not None
    gate = asyncio.Semaphore(PUBLISH_CONCURRENCY)

    async def one(run: Run) -> None:
        async with gate:
            try:
                await state.publish_due(run)
            except Exception as err:
                # The run is in the ledger: the ticker's recovery publishes it within seconds.
                log.warning("backfill %s: publish failed (%s); recovery will publish it", run.id, err)

    await asyncio.gather(*(one(r) for r in runs))
