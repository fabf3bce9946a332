"""`/v1/jobs`: create, read, change, apply, enable, disable and delete the caller's jobs.

Every write validates the whole job before touching the store (invariant 4), takes the tenant
from the token (invariant 5), and announces the change through `GatewayState.on_job_changed`
once it is committed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request, Response, status
from pydantic import BaseModel, Field, ValidationError

from kjob._time import utcnow
from kjob.errors import InvalidInput, NotFound
from kjob.gateway.errors import error_response
from kjob.gateway.auth import Editor, Operator, Viewer, actor_of, gateway_state
from kjob.gateway.state import ChangeKind, GatewayState
from kjob.gateway.tenant_checks import check_job_for_tenant, check_new_jobs
from kjob.gateway.limits import MAX_APPLY_JOBS
from kjob.gateway.validation import check_job, check_storable, check_target
from kjob.store.usage import UsageStore
from kjob.model.job import TEXT_CHECKED, Job, JobSpec, Timing, error_from_detail, in_job, merge_job
from kjob.model.run import utc_text
from kjob.model.schedule import Schedule
from kjob.model.views import AppliedAction, ApplyResult, JobView
from kjob.store.jobs import Applied, gc_paused
from kjob.store.tokens import Principal

log = logging.getLogger(__name__)

router = APIRouter(tags=["jobs"])

State = Annotated[GatewayState, Depends(gateway_state)]





class ApplyRequest(BaseModel):
    jobs: list[JobSpec] = Field(min_length=1, max_length=MAX_APPLY_JOBS)


class ApplyResponse(BaseModel):
    results: list[ApplyResult]


class ApplyActionsResponse(BaseModel):
    """The answer of `results=actions`."""

    results: list[AppliedAction]


#: How much an apply answers of each job (the query parameter `results`).
ApplyAnswer = Literal["jobs", "actions"]


class DisableRequest(BaseModel):
    note: str | None = Field(default=None, max_length=1000, description="why the job is paused; shown by inspect")


def next_fire(job: Job, now: datetime) -> datetime | None:
    """The next slot the ticker will run: none while disabled, none before `enabled_at`."""
    if not job.enabled:
        return None
    after = max(now, job.enabled_at) if job.enabled_at else now
    return Schedule.parse(job.schedule).next_slot(after, job.timezone)


def job_view(job: Job, now: datetime) -> JobView:
    fire = next_fire(job, now)
    return JobView.model_validate({**dict(job), "next_fire": utc_text(fire) if fire else None})


async def _announce(state: GatewayState, job: Job | None, tenant: str, slug: str, kind: ChangeKind) -> None:
    # The write is committed: a failed announcement must not turn it into an error for the
    # client. The ticker's periodic resync picks the change up anyway.
    try:
        await state.on_job_changed(job, tenant, slug, kind)
    except Exception:
        log.exception("job %s/%s %s, but announcing it failed", tenant, slug, kind)


async def _previous(state: GatewayState, tenant: str, slug: str) -> Job | None:
    try:
        return await state.jobs.get(tenant, slug)
    except NotFound:
        return None


async def _check(state: GatewayState, tenant: str, spec: JobSpec, now: datetime,
                 previous: JobSpec | Timing | None = None,
                 text_checked: bool = False) -> None:
    check_job(
        spec,
        agents=state.agents,
        relay_configured=state.relay_configured,
        now=now,
        previous=previous,  # a Job is a JobSpec: no copy (a job file may hold 10,000)
        text_checked=text_checked,
        channel_kinds=state.settings.relay_channel_kinds,
    )
    await check_job_for_tenant(state, tenant, spec, now, previous)
    await check_target(spec, state.settings.dispatcher.allow_list())


async def _apply_checked(state: GatewayState, principal: Principal, spec: JobSpec, now: datetime) -> ApplyResult:
    job, action = await state.jobs.apply(actor_of(principal), spec)
    if action != "unchanged":
        await _announce(state, job, principal.tenant, spec.slug, action)
    return ApplyResult(action=action, job=job_view(job, now))


@router.post("/jobs", status_code=status.HTTP_201_CREATED, response_model=JobView)
async def create_job(spec: JobSpec, principal: Editor, state: State) -> JobView:
    """Create a job. 409 if the slug is taken in this tenant."""
    now = utcnow()
    await _check(state, principal.tenant, spec, now)
    await check_new_jobs(state, principal.tenant, 1)
    job = await state.jobs.create(actor_of(principal), spec)
    await _announce(state, job, principal.tenant, job.slug, "created")
    return job_view(job, now)


@router.get("/jobs", response_model=list[JobView])
async def list_jobs(
    principal: Viewer,
    state: State,
    limit: Annotated[int | None, Query(ge=1, le=1000, description="at most this many; default all")] = None,
    after: Annotated[str | None, Query(description="only slugs after this one: the last of the page before")] = None,
) -> list[JobView]:
    """The tenant's jobs, by slug. Paged with `limit` and `after`: a page shorter than `limit`
    is the last."""
    now = utcnow()
    return [job_view(job, now) for job in await state.jobs.list(principal.tenant, after=after, limit=limit)]


#: The body of `/jobs:apply` as OpenAPI shows it: the endpoint reads the body itself (below).
_APPLY_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "title": "ApplyRequest", "type": "object", "required": ["jobs"],
    "properties": {"jobs": {"type": "array", "minItems": 1, "maxItems": MAX_APPLY_JOBS,
                            "items": {"$ref": "#/components/schemas/JobSpec"}}},
}}}}}

#: Jobs checked between two yields to the event loop: the ticker may share it, and its lease
#: must be renewed every few hundred ms while a file of 10,000 jobs is checked.
_CHECKS_PER_YIELD = 200


def _parse_apply(body: bytes) -> list[JobSpec]:
    """The jobs of an apply body. Raises InvalidInput naming `jobs.<i>.<field>` (and the job,
    by its slug, in the message), or ValueError for a body that is not JSON."""
    # Some 100,000 objects for a file of 10,000 jobs, none in a cycle: the collector's passes
    # over them were 2/3 of the time.
    with gc_paused():
        try:
            data = json.loads(body)
        except RecursionError:
            raise ValueError("nested too deeply") from None
        try:
            # BodyLimit checked the whole body's text: not again, job by job.
            return ApplyRequest.model_validate(data, context={TEXT_CHECKED: True}).jobs
        except ValidationError as err:
            raise _body_error(data, err.errors()[0]) from None


def _body_error(data: Any, first: Any) -> InvalidInput:
    """pydantic's first error in an apply body, naming the job by its slug as the checks after
    it do: `job 'audit': prompt is required`, field `jobs.3.prompt`."""
    e = error_from_detail(first)
    loc = first["loc"]
    if len(loc) < 2 or loc[0] != "jobs" or not isinstance(loc[1], int):
        return InvalidInput(e.message, e.field or "body")
    where = f"jobs.{loc[1]}"
    job = data["jobs"][loc[1]]
    inner = InvalidInput(e.message, (e.field or "")[len(where) + 1:] or None)
    return InvalidInput(in_job(inner, job.get("slug") if isinstance(job, dict) else None, where), e.field)


def _apply_response(applied: list[Applied], now: datetime, results: ApplyAnswer) -> Response:
    if results == "actions":  # what `kjob apply` prints: a small answer, whatever the jobs hold
        body = json.dumps({"results": [{"slug": a.slug, "action": a.action} for a in applied]})
        return Response(body, media_type="application/json")
    response = ApplyResponse(results=[ApplyResult(action=a.action, job=job_view(a.job(), now)) for a in applied])
    return Response(response.model_dump_json(), media_type="application/json")


@router.post("/jobs:apply", response_model=ApplyResponse | ApplyActionsResponse, openapi_extra=_APPLY_BODY)
async def apply_jobs(
    raw: Request,
    principal: Editor,
    state: State,
    results: Annotated[ApplyAnswer, Query(
        description="`jobs`: each result holds its job as GET shows it; `actions`: only its slug and action "
                    "(`kjob apply`: the same answer for 10,000 jobs in a fraction of the time)")] = "jobs",
) -> Response:
    """Create or update several jobs, idempotently (a job file), all or none. Every job is
    checked before any is written: one bad job refuses the whole request, naming it
    (`jobs.<i>.<field>`); then all are written in one transaction and announced together.

    The body is parsed and the answer built in a worker thread: for 10,000 jobs each takes
    a large share of a second of CPU, which on the event loop would stall every other
    request and the ticker's lease renewals of a node running both."""
    now = utcnow()
    try:
        specs = await asyncio.to_thread(_parse_apply, await raw.body())
    except InvalidInput:
        raise
    except ValueError as err:
        return error_response(400, f"the request body is not valid JSON: {err}", "body")
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.slug in seen:
            raise InvalidInput(f"slug {spec.slug!r} appears twice (jobs {seen[spec.slug]} and {i})", f"jobs.{i}.slug")
        seen[spec.slug] = i
    previous = await state.jobs.timings(principal.tenant, list(seen))
    for i, spec in enumerate(specs):
        if i % _CHECKS_PER_YIELD == _CHECKS_PER_YIELD - 1:
            await asyncio.sleep(0)
        try:
            await _check(state, principal.tenant, spec, now, previous.get(spec.slug), text_checked=True)
        except InvalidInput as e:
            raise InvalidInput(in_job(e, spec.slug, f"jobs.{i}"), f"jobs.{i}.{e.field}" if e.field else f"jobs.{i}") from None
    # jobs this request creates, for the tenant's job quota
    await check_new_jobs(state, principal.tenant, sum(spec.slug not in previous for spec in specs))
    applied = await state.jobs.apply_many(actor_of(principal), specs)
    changed: list[tuple[Applied, ChangeKind]] = [(a, a.action) for a in applied if a.action != "unchanged"]
    if changed:
        try:  # committed: a failed announcement must not fail the request (the ticker resyncs)
            await state.on_jobs_changed(principal.tenant, changed)
        except Exception:
            log.exception("%d jobs of %s applied, but announcing them failed", len(changed), principal.tenant)
    return await asyncio.to_thread(_apply_response, applied, now, results)


@router.get("/jobs/{slug}", response_model=JobView)
async def get_job(slug: str, principal: Viewer, state: State) -> JobView:
    job = await state.jobs.get(principal.tenant, slug)
    view = job_view(job, utcnow())
    if state.runs is None:
        return view
    return view.model_copy(update={"usage_7d": await UsageStore(state.runs.engine).job_week(job.id)})


@router.put("/jobs/{slug}", response_model=ApplyResult,
            responses={201: {"model": ApplyResult, "description": "created"}})
async def put_job(slug: str, spec: JobSpec, principal: Editor, state: State, response: Response) -> ApplyResult:
    """Create or replace one job, idempotently: 201 when created, 200 otherwise."""
    if spec.slug != slug:
        raise InvalidInput(f"the body's slug {spec.slug!r} differs from the URL's {slug!r}", "slug")
    now = utcnow()
    previous = await _previous(state, principal.tenant, slug)
    await _check(state, principal.tenant, spec, now, previous)
    if previous is None:
        await check_new_jobs(state, principal.tenant, 1)
    result = await _apply_checked(state, principal, spec, now)
    if result.action == "created":
        response.status_code = status.HTTP_201_CREATED
    return result


@router.patch("/jobs/{slug}", response_model=JobView)
async def patch_job(
    slug: str,
    changes: Annotated[
        dict[str, Any], Body(description="the JobSpec fields to change; nested tables merge key by key")
    ],
    principal: Editor,
    state: State,
) -> JobView:
    """Change some fields of a job. The slug cannot change (create a new job instead)."""
    if "slug" in changes and changes["slug"] != slug:
        raise InvalidInput("a job's slug cannot change; create a job with the new slug and delete this one", "slug")
    now = utcnow()
    current = await state.jobs.get(principal.tenant, slug)
    spec = merge_job(current.spec(), changes)
    await _check(state, principal.tenant, spec, now, current)
    job = await state.jobs.update(actor_of(principal), slug, spec)
    await _announce(state, job, principal.tenant, slug, "updated")
    return job_view(job, now)


@router.delete("/jobs/{slug}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_job(slug: str, principal: Editor, state: State) -> Response:
    """Delete a job and its run history."""
    # The event names the job by id: the ticker finds its entry by id, and drops it.
    job = await state.jobs.delete(actor_of(principal), slug)
    await _announce(state, job, principal.tenant, slug, "deleted")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/jobs/{slug}/enable", response_model=JobView)
async def enable_job(slug: str, principal: Operator, state: State) -> JobView:
    """Enable a job. Slots before now never run: no burst of old slots (invariant 1)."""
    job = await state.jobs.set_enabled(actor_of(principal), slug, True)
    await _announce(state, job, principal.tenant, slug, "enabled")
    return job_view(job, utcnow())


@router.post("/jobs/{slug}/disable", response_model=JobView)
async def disable_job(slug: str, principal: Operator, state: State, body: DisableRequest | None = None) -> JobView:
    """Pause a job, with an optional note saying why."""
    note = body.note if body else None
    check_storable(note, "note")
    job = await state.jobs.set_enabled(actor_of(principal), slug, False, note=note)
    await _announce(state, job, principal.tenant, slug, "disabled")
    return job_view(job, utcnow())
