"""Runs: start one now, list a job's history, inspect one, read or follow its log.

A run belongs to its job's tenant; another tenant's run answers 404 like a missing one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Depends, Query, Response, status
from fastapi.responses import PlainTextResponse, StreamingResponse
from nats.js.api import DeliverPolicy

from kjob.bus import names
from kjob.errors import ServerError
from kjob.gateway.auth import Operator, Viewer, actor_of, gateway_state
from kjob.gateway.state import GatewayState
from kjob.gateway.tenant_checks import run_now_guard
from kjob.model.run import Run
from kjob.model.views import MissedRangeView, RunDetail, RunView, run_view
from kjob.store.runs import RunReads
from kjob.store.slots import SlotLedger
from kjob.store.usage import UsageStore

log = logging.getLogger(__name__)

router = APIRouter(tags=["runs"])
State = Annotated[GatewayState, Depends(gateway_state)]





_NO_LEDGER = "this gateway has no run ledger configured"


def _reads(state: GatewayState) -> RunReads:
    if state.runs is None:
        raise ServerError(_NO_LEDGER)
    return state.runs


def slot_ledger(state: GatewayState) -> SlotLedger:
    """The ledger's slots, for runs outside the schedule (run-now, backfill)."""
    if state.slots is None:
        raise ServerError(_NO_LEDGER)
    return state.slots


@router.post("/jobs/{slug}/run", status_code=status.HTTP_202_ACCEPTED, response_model=RunView)
async def run_now(slug: str, principal: Operator, state: State) -> RunView:
    """Start a run of the job now, outside its schedule (also when the job is disabled).
    429 beyond the tenant's run-now rate (`run_now_per_minute`)."""
    job = await state.jobs.get(principal.tenant, slug)
    if state.publish_due is None:
        raise ServerError("this gateway cannot start runs: it runs without a bus")
    run = await slot_ledger(state).create_manual(
        job, actor=actor_of(principal), guard=run_now_guard(state, principal.tenant)
    )
    try:
        await state.publish_due(run)
    except Exception as err:
        # The run is in the ledger: the ticker's recovery publishes it within seconds.
        log.warning("run-now %s: publish failed (%s); recovery will publish it", run.id, err)
    return run_view(run)


@router.get("/jobs/{slug}/runs", response_model=list[RunView])
async def list_runs(
    slug: str,
    principal: Viewer,
    state: State,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    before: Annotated[
        datetime | None, Query(description="only slots before this instant: the last slot of the page before")
    ] = None,
) -> list[RunView]:
    """The job's runs, newest slot first. Paged with `limit` and `before`: a page shorter than
    `limit` is the last."""
    job = await state.jobs.get(principal.tenant, slug)
    runs = await _reads(state).list_for_job(job.id, limit, before)
    usage = await UsageStore(_reads(state).engine).of_runs([r.id for r in runs])
    return [run_view(r, usage.get(r.id)) for r in runs]


@router.get("/jobs/{slug}/missed", response_model=list[MissedRangeView])
async def list_missed_ranges(
    slug: str, principal: Viewer, state: State, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> list[MissedRangeView]:
    """The job's compact records of missed slots, newest first (see `/runs` for the rest)."""
    job = await state.jobs.get(principal.tenant, slug)
    return [MissedRangeView(first_slot=r.first, last_slot=r.last, count=r.count, count_exact=r.exact, reason=r.reason,
                            reason_code=r.reason_code)
            for r in await _reads(state).missed_ranges(job.id, limit)]


@router.get("/runs/{run_id}", response_model=RunDetail)
async def get_run(run_id: str, principal: Viewer, state: State) -> RunDetail:
    """A run and its attempts. `run_id` may be a short id, as tables show it: any prefix of
    at least 4 characters that starts only one of the tenant's runs (422 naming `run_id` when
    it starts several)."""
    reads = _reads(state)
    run = await reads.get(principal.tenant, run_id)  # run_id may be a short id: use run.id below
    usage = (await UsageStore(reads.engine).of_runs([run.id])).get(run.id)
    return RunDetail.model_validate({**dict(run_view(run, usage)), "attempts": await reads.attempts(run.id)})


# `Response`, not PlainTextResponse: the route's class would also make its JSON errors text/plain
# in the OpenAPI document; the 200 is described here instead.
@router.get("/runs/{run_id}/logs", response_class=Response,
            responses={200: {"description": "the output", "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def run_logs(
    run_id: str,
    principal: Viewer,
    state: State,
    follow: Annotated[bool, Query(description="stream the output live until the run ends")] = False,
):
    """The run's output. Finished: the stored output (up to the executor's cap). Running,
    with `follow=true`: the output so far, then live, until the run ends."""
    reads = _reads(state)
    run = await reads.get(principal.tenant, run_id)
    if run.status.final or not follow or state.js is None:
        output, _, dropped = await reads.log(principal.tenant, run.id)
        if dropped:
            output += f"\n[kjob: {dropped} more bytes were produced beyond the output cap]\n"
        return PlainTextResponse(output)
    return StreamingResponse(_follow(state, reads, run), media_type="text/plain")


async def _follow(state: GatewayState, reads: RunReads, run: Run) -> AsyncIterator[bytes]:
    """Live output from the run's log subject, from the start, until the run is final."""
    assert state.js is not None
    sub = await state.js.subscribe(
        names.run_log(run.tenant, run.id), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except (asyncio.TimeoutError, TimeoutError):
                msg = None
            except Exception:  # nats' own timeout type differs across versions
                msg = None
            if msg is not None:
                kind = (msg.headers or {}).get(names.HDR_STREAM)
                if kind != "end":
                    yield msg.data
                    continue
            current = await reads.get(run.tenant, run.id)
            if current.status.final:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
