"""Jobs in PostgreSQL: the `jobs` table and each job's `job_dispatch_targets` row.

Every job belongs to one tenant; reads take the tenant and writes take the `Actor` (whose
tenant they act in), so no call here reaches another tenant's job (invariant 5). Every write
is one transaction with its audit row. A write that changes nothing writes nothing.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel
from sqlalchemy import Row, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kjob.errors import Conflict, InvalidInput, NotFound
from kjob.model.job import Job, JobSpec
from kjob.store.audit import Actor, record_by
from kjob.store.tables import job_dispatch_targets, jobs

ApplyResult = Literal["created", "updated", "unchanged"]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def dispatch_kind(channel: str) -> str:
    """`none` (results stored only), `webhook` (`webhook:<url>`) or `relay` (any other channel)."""
    if channel == "none":
        return "none"
    if channel.startswith("webhook:"):
        return "webhook"
    return "relay"


#: The columns a Job is built from (the others copy parts of `spec` for queries).
JOB_COLUMNS = (
    jobs.c.id, jobs.c.tenant, jobs.c.slug, jobs.c.spec, jobs.c.enabled,
    jobs.c.created_at, jobs.c.updated_at, jobs.c.enabled_at, jobs.c.paused_note,
)

#: The spec's nested models (sandbox, output, retries, catchup), found from the model itself.
_SUBMODELS: dict[str, type[BaseModel]] = {
    name: field.annotation
    for name, field in JobSpec.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
}


class SharedParts:
    """Validated nested models, shared between the jobs whose values are equal.

    They are frozen, so sharing is safe; and 100,000 jobs mostly repeat a handful of sandbox,
    retry and catch-up settings, so `list_enabled` validates each distinct one once and the
    ticker holds each once.
    """

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], BaseModel] = {}

    def get(self, name: str, value: Any) -> Any:
        model = _SUBMODELS.get(name)
        if model is None or not isinstance(value, dict):
            return value
        key = (name, json.dumps(value, sort_keys=True))
        shared = self._models.get(key)
        if shared is None:
            shared = self._models[key] = model.model_validate(value)
        return shared


def job_from_row(row: Row[Any], shared: SharedParts | None = None) -> Job:
    """A `Job` from a `jobs` row (at least `JOB_COLUMNS`). The columns win over the copies
    in `spec`. Pass one `SharedParts` when building many jobs."""
    spec = row.spec if shared is None else {name: shared.get(name, value) for name, value in row.spec.items()}
    return Job.model_validate(
        {
            **spec,
            "slug": row.slug,
            "enabled": row.enabled,
            "id": row.id,
            "tenant": row.tenant,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "enabled_at": row.enabled_at,
            "paused_note": row.paused_note,
        }
    )


def _spec_json(spec: JobSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")


def _spec_columns(spec: JobSpec) -> dict[str, Any]:
    """The values of the columns that copy the spec (kept in step with `spec` on every write)."""
    return {
        "spec": _spec_json(spec),
        "schedule": spec.schedule,
        "timezone": spec.timezone,
        "agent": spec.agent,
        "enabled": spec.enabled,
    }


def _diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`{field: {"from": old, "to": new}}` for every top-level field that differs."""
    return {
        key: {"from": old.get(key), "to": new.get(key)}
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    }


def _target(slug: str) -> str:
    return f"job/{slug}"


class JobStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # Reads

    async def get(self, tenant: str, slug: str) -> Job:
        """The tenant's job `slug`. Raises NotFound (also for another tenant's job)."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.tenant == tenant, jobs.c.slug == slug))).first()
        if row is None:
            raise NotFound("job", slug)
        return job_from_row(row)

    async def get_by_id(self, job_id: uuid.UUID) -> Job | None:
        """Any tenant's job by id: for the pipeline, which gets ids from its own messages."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).first()
        return job_from_row(row) if row is not None else None

    async def list(self, tenant: str) -> list[Job]:
        """The tenant's jobs, by slug."""
        async with self.engine.connect() as conn:
            query = select(*JOB_COLUMNS).where(jobs.c.tenant == tenant).order_by(jobs.c.slug)
            rows = (await conn.execute(query)).all()
        shared = SharedParts()
        return [job_from_row(r, shared) for r in rows]

    async def list_enabled(self) -> list[Job]:
        """Every enabled job of every tenant: what the ticker schedules."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(*JOB_COLUMNS).where(jobs.c.enabled))).all()
        shared = SharedParts()
        return [job_from_row(r, shared) for r in rows]

    # Writes

    async def create(self, actor: Actor, spec: JobSpec) -> Job:
        """Store a new job in the actor's tenant. Raises Conflict if the slug is taken there."""
        async with self.engine.begin() as conn:
            job = await self._insert(conn, actor, spec)
        if job is None:
            raise Conflict(
                f"a job named {spec.slug!r} already exists; change it with update/apply, "
                "or pick another slug"
            )
        return job

    async def update(self, actor: Actor, slug: str, spec: JobSpec) -> Job:
        """Replace job `slug` with `spec` (whose slug must be `slug`: jobs are not renamed).

        Bumps `version` and `updated_at`; enabling the job sets `enabled_at` to now and clears
        its pause note. Raises NotFound if the tenant has no such job.
        """
        if spec.slug != slug:
            raise InvalidInput(
                f"the job is {slug!r} but the new spec says {spec.slug!r}; a job cannot be renamed "
                "(create the new slug and delete the old one)",
                "slug",
            )
        async with self.engine.begin() as conn:
            row = await self._lock(conn, actor.tenant, slug)
            if row is None:
                raise NotFound("job", slug)
            job, _ = await self._replace(conn, actor, row, spec)
        return job

    async def apply(self, actor: Actor, spec: JobSpec) -> tuple[Job, ApplyResult]:
        """Create the job or make it equal `spec`: declarative and idempotent.

        Applying the same spec twice changes nothing the second time (no audit row either).
        """
        async with self.engine.begin() as conn:
            row = await self._lock(conn, actor.tenant, spec.slug)
            if row is None:
                created = await self._insert(conn, actor, spec)
                if created is not None:
                    return created, "created"
                # Someone created it since our SELECT: lock their row and update it instead.
                row = await self._lock(conn, actor.tenant, spec.slug)
                assert row is not None
            job, changed = await self._replace(conn, actor, row, spec)
        return job, "updated" if changed else "unchanged"

    async def set_enabled(self, actor: Actor, slug: str, enabled: bool, note: str | None = None) -> Job:
        """Enable or pause job `slug`.

        Pausing keeps `note` (why it is paused). Enabling clears the note and sets `enabled_at`
        to now, so no slot from the paused time runs (invariant 1). Enabling an enabled job, or
        pausing a paused one with the same note, changes nothing.
        """
        async with self.engine.begin() as conn:
            row = await self._lock(conn, actor.tenant, slug)
            if row is None:
                raise NotFound("job", slug)
            new_note = None if enabled else note
            if row.enabled == enabled and row.paused_note == new_note:
                return job_from_row(row)
            now = utcnow()
            values: dict[str, Any] = {
                "enabled": enabled,
                "spec": {**row.spec, "enabled": enabled},
                "paused_note": new_note,
                "version": row.version + 1,
                "updated_at": now,
            }
            if enabled and not row.enabled:
                values["enabled_at"] = now
            updated = (
                await conn.execute(jobs.update().where(jobs.c.id == row.id).values(**values).returning(jobs))
            ).one()
            await record_by(
                conn, actor, "job.enable" if enabled else "job.disable", _target(slug),
                {"enabled": {"from": row.enabled, "to": enabled}, "note": new_note},
            )
        return job_from_row(updated)

    async def delete(self, actor: Actor, slug: str) -> None:
        """Delete job `slug` (its runs go with it). Raises NotFound if the tenant has no such job."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    jobs.delete()
                    .where(jobs.c.tenant == actor.tenant, jobs.c.slug == slug)
                    .returning(jobs.c.spec)
                )
            ).first()
            if row is None:
                raise NotFound("job", slug)
            await record_by(conn, actor, "job.delete", _target(slug), {"spec": row.spec})

    # Helpers, each inside the caller's transaction

    async def _lock(self, conn: AsyncConnection, tenant: str, slug: str) -> Row[Any] | None:
        query = select(jobs).where(jobs.c.tenant == tenant, jobs.c.slug == slug).with_for_update()
        return (await conn.execute(query)).first()

    async def _insert(self, conn: AsyncConnection, actor: Actor, spec: JobSpec) -> Job | None:
        """Insert the job; None if the slug is taken in the tenant."""
        now = utcnow()
        row = (
            await conn.execute(
                insert(jobs)
                .values(
                    id=uuid.uuid4(),
                    tenant=actor.tenant,
                    slug=spec.slug,
                    enabled_at=now if spec.enabled else None,
                    version=1,
                    created_at=now,
                    updated_at=now,
                    **_spec_columns(spec),
                )
                .on_conflict_do_nothing(index_elements=[jobs.c.tenant, jobs.c.slug])
                .returning(jobs)
            )
        ).first()
        if row is None:
            return None
        await self._set_target(conn, row.id, spec.output.channel, now)
        await record_by(conn, actor, "job.create", _target(spec.slug), {"spec": row.spec})
        return job_from_row(row)

    async def _replace(self, conn: AsyncConnection, actor: Actor, row: Row[Any], spec: JobSpec) -> tuple[Job, bool]:
        """Make the locked `row` equal `spec`. Returns the job and whether anything changed."""
        old = {**row.spec, "enabled": row.enabled}
        new = _spec_json(spec)
        change = _diff(old, new)
        if not change:
            return job_from_row(row), False
        now = utcnow()
        values: dict[str, Any] = {**_spec_columns(spec), "version": row.version + 1, "updated_at": now}
        if spec.enabled and not row.enabled:
            values["enabled_at"] = now
            values["paused_note"] = None
        updated = (
            await conn.execute(jobs.update().where(jobs.c.id == row.id).values(**values).returning(jobs))
        ).one()
        if "output" in change:
            await self._set_target(conn, row.id, spec.output.channel, now)
        await record_by(conn, actor, "job.update", _target(spec.slug), change)
        return job_from_row(updated), True

    async def _set_target(self, conn: AsyncConnection, job_id: uuid.UUID, channel: str, now: datetime) -> None:
        values = {"channel": channel, "kind": dispatch_kind(channel), "updated_at": now}
        await conn.execute(
            insert(job_dispatch_targets)
            .values(job_id=job_id, **values)
            .on_conflict_do_update(index_elements=[job_dispatch_targets.c.job_id], set_=values)
        )
