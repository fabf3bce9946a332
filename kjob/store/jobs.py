"""Jobs in PostgreSQL: the `jobs` table and each job's `job_dispatch_targets` row.

Every job belongs to one tenant; reads take the tenant and writes take the `Actor` (whose
tenant they act in), so no call here reaches another tenant's job (invariant 5). Every write
is one transaction with its audit row. A write that changes nothing writes nothing.
"""

from __future__ import annotations

import asyncio
import builtins
import gc
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, Literal, NamedTuple

import asyncpg
from pydantic import BaseModel
from sqlalchemy import ColumnElement, Row, Select, String, Text, any_, bindparam, cast, literal, select, type_coerce
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID as PgUUID, insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kjob._time import utcnow
from kjob.errors import Conflict, InvalidInput, NotFound
from kjob.model.durations import parse_duration
from kjob.model.job import CatchupPolicy, Job, JobSpec, Timing
from kjob.store.audit import Actor, record_by, record_many_raw
from kjob.store.database import raw_connection
from kjob.model.run import Trigger
from kjob.store.tables import jobs
from kjob.telemetry import metrics

log = logging.getLogger(__name__)

ApplyResult = Literal["created", "updated", "unchanged"]


def dispatch_kind(channel: str) -> str:
    """`none` (results stored only), `webhook` (`webhook:<url>`) or `relay` (any other channel)."""
    if channel == "none":
        return "none"
    if channel.startswith("webhook:"):
        return "webhook"
    return "relay"


#: The spec's nested models (sandbox, output, retries, catchup), found from the model itself.
_SUBMODELS: dict[str, type[BaseModel]] = {
    name: field.annotation
    for name, field in JobSpec.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
}

#: The row's own columns, which win over their copies in `spec`.
_META = ("id", "tenant", "slug", "enabled", "created_at", "updated_at", "enabled_at", "paused_note", "paused_at")


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cycle collector while building many objects that form no cycles.

    Building 100,000 jobs would otherwise run it hundreds of times, each pass scanning
    everything built so far: it doubles the time listing 100,000 jobs takes.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _many_jobs_query() -> Select[Any]:
    """SELECT for `jobs_from_rows`: the row's own columns, the spec without its nested parts
    (as JSON), then each nested part as JSON *text*, so equal parts are recognised without
    being decoded."""
    rest: ColumnElement[Any] = jobs.c.spec
    for name in _SUBMODELS:
        rest = rest.op("-")(literal(name, String))
    parts = [cast(jobs.c.spec[name], Text) for name in _SUBMODELS]
    return select(*(jobs.c[name] for name in _META), type_coerce(rest, JSONB), *parts)


class ScheduledJob(NamedTuple):
    """The fields of a job the ticker schedules by. A tuple: a frozen dataclass took three
    times as long to build, seconds of a load of 1,000,000."""

    id: uuid.UUID
    tenant: str
    slug: str
    schedule: str
    timezone: str
    enabled: bool
    enabled_at: datetime | None
    created_at: datetime
    catchup: CatchupPolicy
    jitter: timedelta
    #: Bumped by every write of the job: the ticker's resync compares it, not the whole row.
    version: int = 0


def _scheduled_query(*extra: ColumnElement[Any]) -> Select[Any]:
    return select(
        jobs.c.id, jobs.c.tenant, jobs.c.slug, jobs.c.schedule, jobs.c.timezone, jobs.c.enabled,
        jobs.c.enabled_at, jobs.c.created_at,
        cast(jobs.c.spec["catchup"], Text), jobs.c.spec["jitter"].astext, jobs.c.version, *extra,
    )


def _scheduled_page_sql(where: str, limit: str) -> str:
    """A page of enabled jobs by id as `_scheduled` reads them, each with its latest slot in
    the ledger (as `SlotLedger.last_slots`): the page is cut first, so the probe of the run
    key's index runs once per job of the page, whatever the planner knows. The ticker
    streams jobs with their cursors instead of holding a dict of every job's."""
    return f"""
SELECT j.id, j.tenant, j.slug, j.schedule, j.timezone, j.enabled, j.enabled_at, j.created_at,
       (j.spec -> 'catchup')::text, j.spec ->> 'jitter', j.version,
       (SELECT max(r.slot) FROM job_runs r
        WHERE r.job_id = j.id AND r.trigger IN ('{Trigger.schedule.value}', '{Trigger.catchup.value}'))
FROM (SELECT * FROM jobs WHERE {where} ORDER BY id LIMIT {limit}) j
ORDER BY j.id
"""


_SCHEDULED_FIRST_PAGE_SQL = _scheduled_page_sql("enabled", "$1")
_SCHEDULED_PAGE_SQL = _scheduled_page_sql("enabled AND id > $1", "$2")


#: Slots the ledger holds before their instant (the ticker's look-ahead) whose job a write
#: stops or re-times: they are no slots of the job any more (a disabled job has none, a
#: re-scheduled one has others), so they go, as if the ticker had not queued them yet. The
#: executor claims a run only while its row is there and `scheduled`. Deleting a job deletes
#: its runs.
_VOID_AHEAD_SQL = """
DELETE FROM job_runs
WHERE job_id = ANY($1::uuid[]) AND status = 'scheduled' AND trigger = 'schedule' AND slot > now()
"""


async def void_slots_ahead(conn: AsyncConnection, job_ids: Sequence[uuid.UUID]) -> None:
    """Inside the transaction of the write that disables or re-times `job_ids`: their slots
    queued ahead (kjob.ticker, `lookahead_ms`) will not run. The executor claims a run only
    while it is `scheduled`, under the same row lock, so a change committed before a slot's
    instant always wins over that slot."""
    if job_ids:
        raw = await conn.get_raw_connection()
        await _void_ahead_raw(raw.driver_connection, job_ids)


@lru_cache(maxsize=1024)
def _catchup(text: str | None) -> CatchupPolicy:
    # Shared between jobs with the same policy: most jobs have the default.
    return CatchupPolicy.model_validate_json(text) if text else CatchupPolicy()


@lru_cache(maxsize=1024)
def _jitter(text: str | None) -> timedelta:
    return parse_duration(text, "jitter") if text else timedelta(0)


def _scheduled(row: Row[Any]) -> ScheduledJob:
    return ScheduledJob(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], _catchup(row[8]), _jitter(row[9]),
                        row[10])


def _scheduled_or_none(row: Row[Any]) -> ScheduledJob | None:
    """The row as the ticker sees it, or None (logged, counted) if a stored value no longer
    reads (a policy stored before a check that now refuses it): one bad row must not stop
    the ticker for every other job."""
    try:
        return _scheduled(row)
    except Exception as err:
        log.error("ticker: job %s (%s/%s) is skipped: its stored row does not read (%s)", row[0], row[1], row[2], err)
        metrics.job_skipped("unreadable")
        return None


def job_from_dict(row: dict[str, Any]) -> Job:
    """A `Job` from a jobs row as a dict (e.g. `row_to_json(jobs)`)."""
    return Job.model_validate({**row["spec"], **{name: row[name] for name in _META}})


def job_from_row(row: Row[Any]) -> Job:
    """A `Job` from a row of `select(jobs)`."""
    columns = row._mapping
    return Job.model_validate({**row.spec, **{name: columns[name] for name in _META}})


def jobs_from_rows(rows: Sequence[Sequence[Any]]) -> list[Job]:
    """Jobs from the rows of `_many_jobs_query()`, fast enough for a tenant of 100,000 jobs.

    Each distinct nested part (sandbox, output, retries, catch-up) is decoded and validated
    once and shared by every job that has it: the models are frozen, so sharing is safe, and
    jobs mostly repeat a handful of such settings, which saves both time and memory.
    So is pydantic's record of which fields were set (a 2 KB set per job, otherwise 3/4 of
    a job's memory): jobs with equal records share one, which a frozen model never changes.
    """
    names = list(_SUBMODELS)
    shared: dict[tuple[str, str], BaseModel] = {}
    fields_sets: dict[frozenset[str], set[str]] = {}
    built: list[Job] = []
    with gc_paused():
        for row in rows:
            spec: dict[str, Any] = row[len(_META)]  # decoded for this row alone: ours to fill in
            for name, text in zip(names, row[len(_META) + 1:], strict=True):
                if text is not None:
                    model = shared.get((name, text))
                    if model is None:
                        model = shared[(name, text)] = _SUBMODELS[name].model_validate_json(text)
                    spec[name] = model
            spec.update(zip(_META, row[:len(_META)], strict=True))
            job = Job.model_validate(spec)
            fields_set = fields_sets.setdefault(frozenset(job.model_fields_set), job.model_fields_set)
            object.__setattr__(job, "__pydantic_fields_set__", fields_set)
            built.append(job)
    return built


def _spec_json(spec: JobSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")


def _spec_columns(spec: JobSpec, as_json: dict[str, Any] | None = None) -> dict[str, Any]:
    """The values of the columns that copy the spec (kept in step with `spec` on every write);
    `as_json`: `_spec_json(spec)`, when the caller has it already."""
    return {
        "spec": _spec_json(spec) if as_json is None else as_json,
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
    def __init__(self, engine: AsyncEngine, *, void_ahead: bool = False) -> None:
        self.engine = engine
        #: Whether the ticker queues slots ahead (`ticker.lookahead_ms` > 0): then a write that
        #: stops or re-times a job removes its queued slots (`void_slots_ahead`).
        self.void_ahead = void_ahead

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

    # `builtins.list` below: inside the class, `list` is the method.
    async def list(self, tenant: str, *, after: str | None = None, limit: int | None = None) -> builtins.list[Job]:
        """The tenant's jobs, by slug; a page of them with `after` (the last slug of the page
        before) and `limit`."""
        async with self.engine.connect() as conn:
            query = _many_jobs_query().where(jobs.c.tenant == tenant).order_by(jobs.c.slug)
            if after is not None:
                query = query.where(jobs.c.slug > after)
            if limit is not None:
                query = query.limit(limit)
            rows = (await conn.execute(query)).all()
        return jobs_from_rows(rows)

    async def list_scheduled(self) -> builtins.list[ScheduledJob]:
        """What the ticker needs of every enabled job, and nothing more: 100,000 full `Job`
        models would cost the ticker hundreds of MB it never reads."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(_scheduled_query().where(jobs.c.enabled))).all()
        with gc_paused():
            return [job for job in map(_scheduled_or_none, rows) if job is not None]

    async def stream_scheduled(self, chunk: int = 2000) -> AsyncIterator[builtins.list[tuple[ScheduledJob, datetime | None]]]:
        """Every enabled job as the ticker sees it, with its latest slot in the ledger, `chunk`
        at a time (by id, one short query each: a cursor over 1,000,000 rows would outlast
        the statement timeout): the ticker holds one chunk's rows at a time, and the event
        loop (its lease renewals) runs between chunks. The next page is read while the
        caller works through this one: read in turn, the load spent a third of its time
        waiting on PostgreSQL. Close the iterator (`contextlib.aclosing`) if you leave early."""
        fetch = asyncio.ensure_future(self._scheduled_page(None, chunk))
        try:
            while True:
                rows = await fetch
                more = len(rows) == chunk
                if more:
                    fetch = asyncio.ensure_future(self._scheduled_page(rows[-1][0], chunk))
                with gc_paused():
                    chunk_jobs = [(job, row[11]) for row in rows if (job := _scheduled_or_none(row)) is not None]
                if chunk_jobs:
                    yield chunk_jobs
                if not more:
                    return
        finally:
            if not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)

    async def _scheduled_page(self, after: uuid.UUID | None, size: int) -> builtins.list[asyncpg.Record]:
        # asyncpg's rows, not SQLAlchemy's: at 1,000,000 jobs its row processing alone was
        # seconds of the ticker's load.
        async with raw_connection(self.engine) as conn:
            if after is None:
                return await conn.fetch(_SCHEDULED_FIRST_PAGE_SQL, size)
            return await conn.fetch(_SCHEDULED_PAGE_SQL, after, size)

    async def stream_versions(self, chunk: int = 5000) -> AsyncIterator[builtins.list[tuple[uuid.UUID, int]]]:
        """(id, version) of every enabled job, `chunk` at a time: the ticker's resync compares
        these and reloads only the jobs that differ."""
        async for rows in self._pages(select(jobs.c.id, jobs.c.version).where(jobs.c.enabled), chunk):
            yield [(row[0], row[1]) for row in rows]

    async def _pages(self, query: Select[Any], size: int) -> AsyncIterator[Sequence[Row[Any]]]:
        """The rows of `query` for enabled jobs (its first column is the job id), `size` at a
        time, by id: each page's ids first (the primary key's order, cheap whatever the
        planner knows), then the query for those ids alone, so a per-row subquery runs `size`
        times per page, never once per job of the table."""
        after: uuid.UUID | None = None
        while True:
            ids_query = select(jobs.c.id).where(jobs.c.enabled).order_by(jobs.c.id).limit(size)
            if after is not None:
                ids_query = ids_query.where(jobs.c.id > after)
            async with self.engine.connect() as conn:
                ids = (await conn.execute(ids_query)).scalars().all()
                if ids:
                    rows = (await conn.execute(query.where(jobs.c.id == any_(
                        bindparam("page", builtins.list(ids), type_=ARRAY(PgUUID)))).order_by(jobs.c.id))).all()
            if ids:
                yield rows
            if len(ids) < size:
                return
            after = ids[-1]

    async def void_slots_ahead(self, job_ids: Sequence[uuid.UUID]) -> None:
        """`void_slots_ahead` on its own: the ticker's, for a change it learnt of after it had
        queued the job's slot (a write that raced its look-ahead)."""
        async with self.engine.begin() as conn:
            await void_slots_ahead(conn, job_ids)

    async def get_scheduled(self, job_id: uuid.UUID) -> ScheduledJob | None:
        """One job as the ticker sees it (None if it is gone), after a job_changed event."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(_scheduled_query().where(jobs.c.id == job_id))).first()
        return _scheduled_or_none(row) if row is not None else None

    async def get_scheduled_many(self, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, ScheduledJob | None]:
        """`get_scheduled` of many jobs in one query: every id is a key, None if gone."""
        query = _scheduled_query().where(jobs.c.id == any_(bindparam("ids", builtins.list(job_ids), type_=ARRAY(PgUUID))))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        found: dict[uuid.UUID, ScheduledJob | None] = dict.fromkeys(job_ids)
        with gc_paused():
            for row in rows:
                found[row[0]] = _scheduled_or_none(row)
        return found

    # Writes

    async def create(self, actor: Actor, spec: JobSpec) -> Job:
        """Store a new job in the actor's tenant. Raises Conflict if the slug is taken there."""
        async with self.engine.begin() as conn:
            job = await self._insert(conn, actor, spec)
        if job is None:
            raise Conflict(
                f"a job named {spec.slug!r} already exists; change it with `kjob update` or `kjob apply`, "
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

    async def timings(self, tenant: str, slugs: Sequence[str]) -> dict[str, Timing]:
        """When each of the tenant's jobs among `slugs` fires, by slug (the missing ones are left
        out): what the checks of an apply compare a new spec with, in one query for a whole job
        file, without reading (and decoding) the jobs whole."""
        async with raw_connection(self.engine) as db:  # 10,000 rows: not through SQLAlchemy's rows
            rows = await db.fetch(_TIMINGS_SQL, tenant, builtins.list(slugs))
        return {slug: Timing(schedule, tz) for slug, schedule, tz in rows}

    async def apply_many(self, actor: Actor, specs: Sequence[JobSpec]) -> builtins.list[Applied]:
        """`apply` of every spec (distinct slugs) in one transaction, all or none, in a few
        statements whatever their number: one lock of the stored ones (PostgreSQL tells which
        differ from their spec, so only those are decoded and compared here), one insert, one
        update, one upsert of targets and one insert of audit rows, each binding whole columns
        as arrays (`unnest`): no per-row work in the driver or SQLAlchemy, which took most of
        an apply of 10,000 jobs as executemany. Results in order."""
        now = utcnow()
        texts = {s.slug: s.model_dump_json() for s in specs}  # the spec column, as JSON text
        async with raw_connection(self.engine) as db, db.transaction():
            locked = await _lock_many_raw(db, actor.tenant, texts)
            # New slugs in one order (by slug): two applies creating the same ones cannot deadlock.
            fresh = sorted((s for s in specs if s.slug not in locked), key=lambda s: s.slug)
            out: dict[str, Applied] = {}
            targets: builtins.list[tuple[uuid.UUID, str]] = []
            audits: dict[str, tuple[str, str]] = {}  # slug: (action, change as JSON text)
            if fresh:
                new = {s.slug: _new_columns(actor.tenant, s, now) for s in fresh}
                inserted = {r[0] for r in await db.fetch(
                    _INSERT_MANY_SQL, actor.tenant, now, [new[s.slug]["id"] for s in fresh],
                    [s.slug for s in fresh], [texts[s.slug] for s in fresh], [s.schedule for s in fresh],
                    [s.timezone for s in fresh], [s.agent for s in fresh], [s.enabled for s in fresh])}
                for spec in fresh:
                    if spec.slug in inserted:
                        out[spec.slug] = Applied(spec, "created", new[spec.slug])
                        targets.append((new[spec.slug]["id"], spec.output.channel))
                        audits[spec.slug] = ("job.create", f'{{"spec": {texts[spec.slug]}}}')
                raced = {s.slug: texts[s.slug] for s in fresh if s.slug not in inserted}
                if raced:  # created by someone else since our lock: update theirs instead
                    locked.update(await _lock_many_raw(db, actor.tenant, raced))
            updates: builtins.list[tuple[Any, ...]] = []
            voids: builtins.list[uuid.UUID] = []
            by_slug = {s.slug: s for s in specs}
            for slug, row in locked.items():  # by id: the lock's order
                spec = by_slug[slug]
                change, values = _replacement(row, spec, now) if row.spec is not None else ({}, {})
                if not change:  # the spec equals the stored one
                    out[slug] = Applied(spec, "unchanged", row.columns())
                    continue
                columns = {**row.columns(), **{k: values[k] for k in _META if k in values}}
                out[slug] = Applied(spec, "updated", columns)
                updates.append((row.id, texts[slug], spec.schedule, spec.timezone, spec.agent, spec.enabled,
                                values["version"], values["enabled_at"], values["paused_note"], values["paused_at"]))
                if "output" in change:
                    targets.append((row.id, spec.output.channel))
                if self.void_ahead and _stops_or_retimes(row, change):
                    voids.append(row.id)
                audits[slug] = ("job.update", json.dumps(change, ensure_ascii=False))
            await _void_ahead_raw(db, voids)
            if updates:
                await db.execute(_UPDATE_MANY_SQL, now, *map(builtins.list, zip(*updates, strict=True)))
            await _upsert_targets_raw(db, now, targets)
            entries = [(action, _target(s.slug), change) for s in specs if s.slug in audits
                       for action, change in (audits[s.slug],)]
            await record_many_raw(db, actor, entries)  # in file order, as the writes were asked
        return [out[s.slug] for s in specs]

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
            if not enabled and row.enabled and self.void_ahead:
                await void_slots_ahead(conn, [row.id])
            if enabled:
                values["paused_at"] = None
            elif row.enabled or row.paused_at is None:
                values["paused_at"] = now  # a new note on a paused job keeps when it was paused
            updated = (
                await conn.execute(jobs.update().where(jobs.c.id == row.id).values(**values).returning(jobs))
            ).one()
            await record_by(
                conn, actor, "job.enable" if enabled else "job.disable", _target(slug),
                {"enabled": {"from": row.enabled, "to": enabled}, "note": new_note},
            )
        return job_from_row(updated)

    async def pause_unless_paused(self, actor: Actor, job_id: uuid.UUID, note: str) -> Job | None:
        """Pause the job with `note`, unless it is already paused (or gone): then None, and the
        pause that is there, with its own note, stays as it is. Whoever gets a Job back is the
        one caller that paused it, so what follows a pause (an alert) happens once."""
        now = utcnow()
        async with self.engine.begin() as conn:
            updated = (
                await conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id, jobs.c.tenant == actor.tenant, jobs.c.enabled)
                    .values(enabled=False, spec=jobs.c.spec.op("||")(literal({"enabled": False}, JSONB)),
                            paused_note=note, paused_at=now, version=jobs.c.version + 1, updated_at=now)
                    .returning(jobs)
                )
            ).first()
            if updated is None:
                return None
            if self.void_ahead:
                await void_slots_ahead(conn, [job_id])
            await record_by(conn, actor, "job.disable", _target(updated.slug),
                            {"enabled": {"from": True, "to": False}, "note": note})
        return job_from_row(updated)

    async def delete(self, actor: Actor, slug: str) -> Job:
        """Delete job `slug` (its runs go with it) and return it as it was, so the change can be
        announced with its id. Raises NotFound if the tenant has no such job."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    jobs.delete()
                    .where(jobs.c.tenant == actor.tenant, jobs.c.slug == slug)
                    .returning(jobs)
                )
            ).first()
            if row is None:
                raise NotFound("job", slug)
            await record_by(conn, actor, "job.delete", _target(slug), {"spec": row.spec})
        return job_from_row(row)

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
                .values(**_new_row(actor.tenant, spec, now))
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
        change, values = _replacement(row, spec, utcnow())
        if not change:
            return job_from_row(row), False
        if self.void_ahead and _stops_or_retimes(row, change):
            await void_slots_ahead(conn, [row.id])
        updated = (
            await conn.execute(jobs.update().where(jobs.c.id == row.id).values(**values).returning(jobs))
        ).one()
        if "output" in change:
            await self._set_target(conn, row.id, spec.output.channel, values["updated_at"])
        await record_by(conn, actor, "job.update", _target(spec.slug), change)
        return job_from_row(updated), True

    async def _set_target(self, conn: AsyncConnection, job_id: uuid.UUID, channel: str, now: datetime) -> None:
        raw = await conn.get_raw_connection()  # the same transaction: the batch's statement serves one job too
        await _upsert_targets_raw(raw.driver_connection, now, [(job_id, channel)])


def _new_row(tenant: str, spec: JobSpec, now: datetime) -> dict[str, Any]:
    """Every column of a new job: its own ones and those that copy the spec."""
    return {**_new_columns(tenant, spec, now), "version": 1, **_spec_columns(spec)}


def _replacement(row: Row[Any] | _Locked, spec: JobSpec, now: datetime) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what changes, the column values) of making `row` equal `spec`: `({}, {})` if nothing.
    Enabling sets `enabled_at` (no burst of the paused time's slots) and clears the pause."""
    assert row.spec is not None, "compared only where the stored spec differs"
    new = _spec_json(spec)
    change = _diff({**row.spec, "enabled": row.enabled}, new)
    if not change:
        return {}, {}
    values: dict[str, Any] = {**_spec_columns(spec, new), "version": row.version + 1, "updated_at": now,
                              "enabled_at": row.enabled_at, "paused_note": row.paused_note,
                              "paused_at": row.paused_at}
    if spec.enabled and not row.enabled:
        values.update(enabled_at=now, paused_note=None, paused_at=None)
    elif row.enabled and not spec.enabled:
        values["paused_at"] = now
    return change, values


def _job_of(spec: JobSpec, columns: Any) -> Job:
    """The stored job: the spec just validated (its parts are models already, so they are
    not rebuilt from JSON, which took most of an apply's time) and the row's own columns."""
    return Job.model_validate({**dict(spec), **{name: columns[name] for name in _META}})


def _stops_or_retimes(row: Row[Any] | _Locked, change: dict[str, Any]) -> bool:
    """Whether a change to the job means its queued slots are no longer its slots."""
    return bool(row.enabled and ("enabled" in change or "schedule" in change or "timezone" in change))


@dataclass(frozen=True, slots=True)
class Applied:
    """One job of `apply_many`: what was done, and the stored job's own columns; the `Job`
    itself is built only when asked for (an answer of actions alone never needs one)."""

    spec: JobSpec
    action: ApplyResult
    columns: dict[str, Any]

    @property
    def id(self) -> uuid.UUID:
        return self.columns["id"]  # type: ignore[no-any-return]

    @property
    def slug(self) -> str:
        return self.spec.slug

    def job(self) -> Job:
        return _job_of(self.spec, self.columns)


@dataclass(frozen=True, slots=True)
class _Locked:
    """A stored job `apply_many` locked: its own columns, and its spec, decoded, only when
    PostgreSQL found it differs from the spec applied (None: they are equal)."""

    id: uuid.UUID
    tenant: str
    slug: str
    enabled: bool
    version: int
    enabled_at: datetime | None
    paused_note: str | None
    paused_at: datetime | None
    created_at: datetime
    updated_at: datetime
    spec: dict[str, Any] | None

    def columns(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _META}


_TIMINGS_SQL = "SELECT slug, schedule, timezone FROM jobs WHERE tenant = $1 AND slug = ANY($2::text[])"

#: The jobs among the slugs, locked in one order (by id: two applies cannot deadlock), each
#: with its stored spec as text only where it differs from the spec applied (as `_replacement`
#: compares: the `enabled` column wins over the spec's copy).
_LOCK_MANY_SQL = """
SELECT j.id, j.tenant, j.slug, j.enabled, j.version, j.enabled_at, j.paused_note, j.paused_at, j.created_at,
       j.updated_at,
       CASE WHEN j.spec || jsonb_build_object('enabled', j.enabled) = n.spec::jsonb THEN NULL ELSE j.spec::text END
         AS spec
FROM jobs j JOIN unnest($2::text[], $3::text[]) AS n(slug, spec) ON j.slug = n.slug
WHERE j.tenant = $1
ORDER BY j.id
FOR UPDATE OF j
"""

_INSERT_MANY_SQL = """
INSERT INTO jobs (id, tenant, slug, spec, schedule, timezone, agent, enabled, enabled_at, paused_at, paused_note,
                  version, created_at, updated_at)
SELECT n.id, $1, n.slug, n.spec::jsonb, n.schedule, n.timezone, n.agent, n.enabled,
       CASE WHEN n.enabled THEN $2::timestamptz END, CASE WHEN NOT n.enabled THEN $2::timestamptz END, NULL,
       1, $2, $2
FROM unnest($3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::bool[])
     WITH ORDINALITY AS n(id, slug, spec, schedule, timezone, agent, enabled, i)
ORDER BY n.i
ON CONFLICT (tenant, slug) DO NOTHING
RETURNING slug
"""

_UPDATE_MANY_SQL = """
UPDATE jobs SET spec = u.spec::jsonb, schedule = u.schedule, timezone = u.timezone, agent = u.agent,
                enabled = u.enabled, version = u.version, updated_at = $1, enabled_at = u.enabled_at,
                paused_note = u.paused_note, paused_at = u.paused_at
FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bool[], $8::int[],
            $9::timestamptz[], $10::text[], $11::timestamptz[])
     AS u(id, spec, schedule, timezone, agent, enabled, version, enabled_at, paused_note, paused_at)
WHERE jobs.id = u.id
"""

_UPSERT_TARGETS_SQL = """
INSERT INTO job_dispatch_targets (job_id, channel, kind, updated_at)
SELECT t.job_id, t.channel, t.kind, $1 FROM unnest($2::uuid[], $3::text[], $4::text[]) AS t(job_id, channel, kind)
ON CONFLICT (job_id) DO UPDATE SET channel = excluded.channel, kind = excluded.kind, updated_at = excluded.updated_at
"""


async def _upsert_targets_raw(db: asyncpg.Connection, now: datetime, targets: Sequence[tuple[uuid.UUID, str]]) -> None:
    """Where each job's results go, (job id, channel) each, resolved to a dispatch kind."""
    if targets:
        await db.execute(_UPSERT_TARGETS_SQL, now, [t[0] for t in targets], [t[1] for t in targets],
                         [dispatch_kind(t[1]) for t in targets])


async def _lock_many_raw(db: asyncpg.Connection, tenant: str, texts: dict[str, str]) -> dict[str, _Locked]:
    """`_LOCK_MANY_SQL` of the slugs of `texts` (slug: the spec applied, as JSON text)."""
    rows = await db.fetch(_LOCK_MANY_SQL, tenant, builtins.list(texts), builtins.list(texts.values()))
    locked = {}
    for r in rows:
        columns = dict(r.items())
        columns["spec"] = json.loads(columns["spec"]) if columns["spec"] is not None else None
        locked[r["slug"]] = _Locked(**columns)
    return locked


async def _void_ahead_raw(db: asyncpg.Connection, job_ids: Sequence[uuid.UUID]) -> None:
    if job_ids:
        await db.execute(_VOID_AHEAD_SQL, builtins.list(job_ids))


def _new_columns(tenant: str, spec: JobSpec, now: datetime) -> dict[str, Any]:
    """The own columns (`_META`) of a job `apply_many` inserts, as `_INSERT_MANY_SQL` sets them."""
    return dict(id=uuid.uuid4(), tenant=tenant, slug=spec.slug, enabled=spec.enabled, created_at=now,
                updated_at=now, enabled_at=now if spec.enabled else None, paused_note=None,
                paused_at=None if spec.enabled else now)
