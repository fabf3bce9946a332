"""`/v1/jobs`: create, read, change, apply, enable, disable and delete the caller's jobs.

Every write validates the whole job before touching the store (invariant 4), takes the tenant
from the token (invariant 5), and announces the change through `GatewayState.on_job_changed`
once it is committed.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Response, status
from pydantic import BaseModel, Field

from kjob.errors import InvalidInput, NotFound
from kjob.gateway.auth import Editor, Operator, Viewer, actor_of, gateway_state
from kjob.gateway.state import ChangeKind, GatewayState
from kjob.gateway.tenant_checks import check_job_for_tenant, check_new_jobs
from kjob.gateway.validation import check_job, check_storable, check_target
from kjob.store.usage import UsageStore
from kjob.model.job import Job, JobSpec, merge_job
from kjob.model.run import utc_text
from kjob.model.schedule import Schedule
from kjob.model.views import ApplyResult, JobView
from kjob.store.tokens import Principal

log = logging.getLogger(__name__)

router = APIRouter(tags=["jobs"])

State = Annotated[GatewayState, Depends(gateway_state)]





class ApplyRequest(BaseModel):
    jobs: list[JobSpec] = Field(min_length=1, max_length=1000)


class ApplyResponse(BaseModel):
    results: list[ApplyResult]


class DisableRequest(BaseModel):
    note: str | None = Field(default=None, max_length=1000, description="why the job is paused; shown by inspect")


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


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


async def _check(state: GatewayState, tenant: str, spec: JobSpec, now: datetime, previous: Job | None = None) -> None:
    check_job(
        spec,
        agents=state.agents,
        relay_configured=state.relay_configured,
        now=now,
        previous=previous.spec() if previous else None,
        channel_kinds=state.settings.relay_channel_kinds,
    )
    await check_job_for_tenant(state, tenant, spec, now, previous.spec() if previous else None)
    await check_target(spec, state.settings.dispatcher.allow_list())


async def _apply_checked(state: GatewayState, principal: Principal, spec: JobSpec, now: datetime) -> ApplyResult:
    job, action = await state.jobs.apply(actor_of(principal), spec)
    if action != "unchanged":
        await _announce(state, job, principal.tenant, spec.slug, action)
    return ApplyResult(action=action, job=job_view(job, now))


@router.post("/jobs", status_code=status.HTTP_201_CREATED, response_model=JobView)
async def create_job(spec: JobSpec, principal: Editor, state: State) -> JobView:
    """Create a job. 409 if the slug is taken in this tenant."""
    now = now_utc()
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
    now = now_utc()
    return [job_view(job, now) for job in await state.jobs.list(principal.tenant, after=after, limit=limit)]


@router.post("/jobs:apply", response_model=ApplyResponse)
async def apply_jobs(request: ApplyRequest, principal: Editor, state: State) -> ApplyResponse:
    """Create or update several jobs, idempotently (a job file). Every job is checked before
    any is written: one bad job refuses the whole request, naming it (`jobs.<i>.<field>`)."""
    now = now_utc()
    seen: dict[str, int] = {}
    adding = 0  # jobs this request creates, for the tenant's job quota
    for i, spec in enumerate(request.jobs):
        if spec.slug in seen:
            raise InvalidInput(f"slug {spec.slug!r} appears twice (jobs {seen[spec.slug]} and {i})", f"jobs.{i}.slug")
        seen[spec.slug] = i
        try:
            previous = await _previous(state, principal.tenant, spec.slug)
            await _check(state, principal.tenant, spec, now, previous)
            adding += previous is None
        except InvalidInput as e:
            raise InvalidInput(
                f"job {spec.slug!r}: {e.message}", f"jobs.{i}.{e.field}" if e.field else f"jobs.{i}"
            ) from None
    await check_new_jobs(state, principal.tenant, adding)
    return ApplyResponse(results=[await _apply_checked(state, principal, spec, now) for spec in request.jobs])


@router.get("/jobs/{slug}", response_model=JobView)
async def get_job(slug: str, principal: Viewer, state: State) -> JobView:
    job = await state.jobs.get(principal.tenant, slug)
    view = job_view(job, now_utc())
    if state.ledger is None:
        return view
    return view.model_copy(update={"usage_7d": await UsageStore(state.ledger.engine).job_week(job.id)})


@router.put("/jobs/{slug}", response_model=ApplyResult,
            responses={201: {"model": ApplyResult, "description": "created"}})
async def put_job(slug: str, spec: JobSpec, principal: Editor, state: State, response: Response) -> ApplyResult:
    """Create or replace one job, idempotently: 201 when created, 200 otherwise."""
    if spec.slug != slug:
        raise InvalidInput(f"the body's slug {spec.slug!r} differs from the URL's {slug!r}", "slug")
    now = now_utc()
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
    now = now_utc()
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
    return job_view(job, now_utc())


@router.post("/jobs/{slug}/disable", response_model=JobView)
async def disable_job(slug: str, principal: Operator, state: State, body: DisableRequest | None = None) -> JobView:
    """Pause a job, with an optional note saying why."""
    note = body.note if body else None
    check_storable(note, "note")
    job = await state.jobs.set_enabled(actor_of(principal), slug, False, note=note)
    await _announce(state, job, principal.tenant, slug, "disabled")
    return job_view(job, now_utc())
