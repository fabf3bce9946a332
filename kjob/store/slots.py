"""The slots of the run ledger: the rows of `job_runs` that say a run is due, and the ticker's
fence. Written by the ticker (each scheduled slot, under the fence of its term), by the API's
run-now and backfill, and read back by the ticker's recovery (runs nobody is moving).

A slot is one row, keyed by its run id (kjob.model.run.run_id_for): writing a slot twice is a
no-op, so a ticker that crashed mid-batch or a re-publish never makes a second run. What runs
it is the claim (kjob.store.claims); what happens to its result, the delivery
(kjob.store.deliveries).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Awaitable, Callable, Iterable, Sequence
from uuid import UUID

import asyncpg
from sqlalchemy import and_, func, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kjob._time import utcnow
from kjob.model.job import Job
from kjob.model.run import DeliveryStatus, MissReason, Run, RunStatus, Trigger, run_id_for, utc_text
from kjob.store._run_rows import FINAL_VALUES, run_of
from kjob.store.audit import Actor, record_by
from kjob.store.database import raw_connection
from kjob.store.overlap import RERUNNABLE, rerun_values
from kjob.store.tables import job_runs

#: Statuses of a run not yet ended: one that should have a due message in the stream.
OPEN = (RunStatus.scheduled.value, RunStatus.running.value, RunStatus.retrying.value)


#: The fence row is read FOR SHARE: a successor's take_lease waits for a batch in flight, and
#: a batch that comes after it sees the new revision and writes nothing. Rows of jobs that are
#: gone, and `scheduled` rows of jobs disabled meanwhile, are left out (and returned as `gone`):
#: their FOR KEY SHARE lock also makes a delete or disable in flight finish first, so the
#: insert neither fails on the foreign key nor adds a slot to a job just disabled.
_RECORD_SLOTS_SQL = """
WITH fence AS (
    SELECT 1 FROM ticker_lease WHERE id = 1 AND revision = $13::bigint FOR SHARE
), given AS (
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::text[],
                         $8::text[], $9::text[], $10::bigint[], $11::timestamptz[], $12::text[])
        AS u(id, job_id, tenant, slug, slot, trigger, status, reason, reason_code, leader_rev, finished_at,
             delivery_status)
), live AS (
    SELECT g.* FROM given g JOIN jobs j ON j.id = g.job_id
    WHERE g.status <> 'scheduled' OR j.enabled
    FOR KEY SHARE OF j
), inserted AS (
    INSERT INTO job_runs (id, job_id, tenant, slug, slot, trigger, status, reason, reason_code, leader_rev, finished_at,
                          delivery_status)
    SELECT * FROM live
    WHERE EXISTS (SELECT 1 FROM fence)
    ON CONFLICT DO NOTHING
    RETURNING id
)
SELECT EXISTS (SELECT 1 FROM fence) AS fenced_in, array(SELECT id FROM inserted) AS ids,
       array(SELECT id FROM given EXCEPT SELECT id FROM live) AS gone
"""

_RECORD_RANGES_SQL = """
WITH fence AS (
    SELECT 1 FROM ticker_lease WHERE id = 1 AND revision = $9::bigint FOR SHARE
), written AS (
    INSERT INTO missed_ranges (job_id, tenant, slug, first_slot, last_slot, count, count_exact, reason, leader_rev,
                               reason_code)
    SELECT u.* FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::bigint[],
                           $7::bool[], $8::text[], $10::bigint[], $11::text[])
        AS u(job_id, tenant, slug, first_slot, last_slot, count, count_exact, reason, leader_rev, reason_code)
    JOIN jobs j ON j.id = u.job_id
    WHERE EXISTS (SELECT 1 FROM fence)
    ON CONFLICT (job_id, first_slot) DO UPDATE SET last_slot = EXCLUDED.last_slot, count = EXCLUDED.count,
        count_exact = EXCLUDED.count_exact, reason = EXCLUDED.reason, reason_code = EXCLUDED.reason_code,
        leader_rev = EXCLUDED.leader_rev,
        recorded_at = now()
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM fence) AS fenced_in, (SELECT count(*) FROM written) AS n
"""

#: A leader that stops withdraws the slots it queued ahead of their instant (the look-ahead):
#: they have not fired, and whoever leads next fires them, or settles them by the catch-up
#: rule if nobody leads by then, as every other slot of a downtime. Only while its fence holds
#: (FOR SHARE: a successor's take_lease, and so its load, come after).
_WITHDRAW_AHEAD_SQL = """
WITH fence AS (
    SELECT 1 FROM ticker_lease WHERE id = 1 AND revision = $1::bigint FOR SHARE
), withdrawn AS (
    DELETE FROM job_runs
    WHERE status = 'scheduled' AND trigger = 'schedule' AND leader_rev = $1::bigint AND slot > now()
      AND EXISTS (SELECT 1 FROM fence)
    RETURNING 1
)
SELECT count(*) FROM withdrawn
"""

_TAKE_LEASE_SQL = """
INSERT INTO ticker_lease (id, revision, node, acquired_at) VALUES (1, $1, $2, now())
ON CONFLICT (id) DO UPDATE SET revision = EXCLUDED.revision, node = EXCLUDED.node, acquired_at = now()
WHERE ticker_lease.revision < EXCLUDED.revision OR ticker_lease.acquired_at < now() - make_interval(secs => $3)
RETURNING revision
"""


class Deposed(Exception):
    """The ledger's fence names another ticker leader: this one must stop writing slots."""


@dataclass(frozen=True, slots=True)
class SlotRow:
    """A slot to write into the ledger."""

    run_id: str
    job_id: UUID
    tenant: str
    slug: str
    slot: datetime
    trigger: Trigger = Trigger.schedule
    status: RunStatus = RunStatus.scheduled
    reason: str | None = None
    reason_code: MissReason | None = None  #: with `reason`, for a slot written `missed`
    leader_rev: int | None = None


@dataclass(frozen=True, slots=True)
class Recorded:
    """What `record_slots` did: the run ids it added, and those it left out because their job
    is gone (or, for a slot that would run, disabled)."""

    new: set[str]
    gone: set[str]

    def __contains__(self, run_id: str) -> bool:
        return run_id in self.new


@dataclass(frozen=True, slots=True)
class MissedRangeRow:
    """A compact record of `count` missed slots of one job, `first` to `last` inclusive."""

    job_id: UUID
    tenant: str
    slug: str
    first: datetime
    last: datetime
    count: int
    exact: bool
    reason: str
    reason_code: MissReason | None = None  #: None only for a record written before migration 0011
    leader_rev: int | None = None


def _check_fenced_in(record: asyncpg.Record, fence: int) -> None:
    if not record["fenced_in"]:
        raise Deposed(f"ticker revision {fence} no longer holds the ledger fence")


class SlotLedger:
    """The ticker's side of the ledger (slots, the fence, recovery) and the API's runs outside
    the schedule (run-now, backfill)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def record_slots(self, rows: Sequence[SlotRow], fence: int) -> Recorded:
        """Insert slots; returns the run ids that were new (a slot already there is skipped)
        and those whose job is gone, or disabled for a slot that would run (not written).

        Nothing is written unless `ticker_lease` still holds `fence` (the ticker leader's
        revision): Deposed is raised. One statement over arrays (`unnest`) whatever the batch
        size: the ticker writes thousands of slots a second.
        """
        if not rows:
            return Recorded(set(), set())
        now = utcnow()
        final = [r.status.final for r in rows]
        # $1 to $12: one array per column of `given`, in its order; $13: the fence.
        columns = dict(
            id=[r.run_id for r in rows], job_id=[r.job_id for r in rows], tenant=[r.tenant for r in rows],
            slug=[r.slug for r in rows], slot=[r.slot for r in rows], trigger=[r.trigger.value for r in rows],
            status=[r.status.value for r in rows], reason=[r.reason for r in rows],
            reason_code=[r.reason_code and r.reason_code.value for r in rows],
            leader_rev=[r.leader_rev for r in rows], finished_at=[now if f else None for f in final],
            delivery_status=[DeliveryStatus.none.value if f else DeliveryStatus.pending.value for f in final],
        )
        async with raw_connection(self.engine) as raw:
            record = await raw.fetchrow(_RECORD_SLOTS_SQL, *columns.values(), fence)
        _check_fenced_in(record, fence)
        return Recorded(set(record["ids"]), set(record["gone"]))

    async def record_missed_ranges(self, ranges: Sequence[MissedRangeRow], fence: int) -> int:
        """Write compact records of missed slots (kjob.model.catchup), under the fence as
        `record_slots`. A record with the same job and first slot is replaced: settling the
        same downtime twice (a crash in between) leaves one record. Returns how many."""
        if not ranges:
            return 0
        # $1 to $8, $10 and $11: one array per column of the record; $9: the fence.
        async with raw_connection(self.engine) as raw:
            record = await raw.fetchrow(
                _RECORD_RANGES_SQL,
                [r.job_id for r in ranges], [r.tenant for r in ranges], [r.slug for r in ranges],
                [r.first for r in ranges], [r.last for r in ranges], [r.count for r in ranges],
                [r.exact for r in ranges], [r.reason for r in ranges],
                fence,
                [r.leader_rev for r in ranges], [r.reason_code and r.reason_code.value for r in ranges],
            )
        _check_fenced_in(record, fence)
        return record["n"]

    async def take_lease(self, revision: int, node: str, stale_after_s: float) -> bool:
        """Write a new leader's fencing token. False if a newer leader already holds it (or an
        older one renewed it within `stale_after_s`, which only happens if NATS lost the lease
        bucket and revisions restarted)."""
        async with raw_connection(self.engine) as raw:
            return await raw.fetchval(_TAKE_LEASE_SQL, revision, node, stale_after_s) is not None

    async def withdraw_ahead(self, fence: int) -> int:
        """Withdraw the slots term `fence` queued ahead of their instant; how many. Nothing if
        the fence has moved on."""
        async with raw_connection(self.engine) as raw:
            return int(await raw.fetchval(_WITHDRAW_AHEAD_SQL, fence))

    async def mark_published(self, run_ids: Iterable[str], at: datetime | None = None) -> None:
        """Record when the stream acknowledged the due messages (`at`; default now)."""
        ids = list(run_ids)
        if not ids:
            return
        async with raw_connection(self.engine) as raw:
            await raw.execute(
                "UPDATE job_runs SET published_at = $2 WHERE id = ANY($1::text[]) AND published_at IS NULL",
                ids, at or utcnow(),
            )

    async def last_slots(self) -> dict[UUID, datetime]:
        """The latest scheduled slot of every job: where each job's ticker cursor resumes."""
        stmt = (
            select(job_runs.c.job_id, func.max(job_runs.c.slot))
            .where(job_runs.c.trigger.in_([Trigger.schedule.value, Trigger.catchup.value]))
            .group_by(job_runs.c.job_id)
        )
        async with self.engine.connect() as conn:
            return {row[0]: row[1] for row in await conn.execute(stmt)}

    async def stranded(self, older_than: timedelta, limit: int = 1000) -> list[Run]:
        """Open runs nobody is moving: never published, claim expired, or retry overdue.

        The ticker re-publishes them, so a lost message or a dead executor cannot leave a run
        open forever; the claim keeps a re-published run from executing twice.
        """
        # The database's clock, as the claims it judges: a ticker whose clock runs ahead must
        # not see live claims as expired and re-publish every running run.
        cutoff = func.now() - older_than
        stmt = (
            select(job_runs)
            .where(
                or_(
                    # Published rows wait in JetStream, which is durable: a deep backlog is
                    # not stranded, and re-publishing it every cycle would only add load.
                    and_(job_runs.c.status == RunStatus.scheduled.value, job_runs.c.published_at.is_(None)),
                    and_(job_runs.c.status == RunStatus.running.value, job_runs.c.claim_until < cutoff),
                    and_(job_runs.c.status == RunStatus.retrying.value, job_runs.c.next_attempt_at < cutoff),
                ),
                job_runs.c.created_at < cutoff,
            )
            .order_by(job_runs.c.slot)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [run_of(r) for r in await conn.execute(stmt)]

    async def undelivered(self, older_than: timedelta, limit: int = 1000) -> list[Run]:
        """Final runs with a delivery no dispatcher has tried or holds, finished `older_than`
        ago (the database's clock): their result message was lost (its executor died, paused
        or was cut off between recording the end and publishing the result)."""
        stmt = (
            select(job_runs)
            .where(
                job_runs.c.status.in_(list(FINAL_VALUES)),
                job_runs.c.delivery_status == DeliveryStatus.pending.value,
                job_runs.c.delivery_attempts == 0,
                job_runs.c.finished_at < func.now() - older_than,
                or_(job_runs.c.claim_until.is_(None), job_runs.c.claim_until < func.now()),
            )
            .order_by(job_runs.c.finished_at)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [run_of(r) for r in await conn.execute(stmt)]

    async def published_waiting(self, older_than: timedelta, limit: int = 1000) -> tuple[dict[str, int], list[Run]]:
        """For the recovery of vanished messages: per tenant, how many open runs should have a
        due message in the stream now (published and waiting, running, or retrying), and the
        published runs still waiting after `older_than`, oldest first."""
        cutoff = func.now() - older_than  # the database's clock, as in `stranded`
        in_stream = or_(job_runs.c.status != RunStatus.scheduled.value, job_runs.c.published_at.is_not(None))
        async with self.engine.connect() as conn:
            counts = {row[0]: row[1] for row in await conn.execute(
                select(job_runs.c.tenant, func.count())
                .where(job_runs.c.status.in_(OPEN), in_stream)
                .group_by(job_runs.c.tenant)
            )}
            waiting = [run_of(r) for r in await conn.execute(
                select(job_runs)
                .where(job_runs.c.status == RunStatus.scheduled.value, job_runs.c.published_at < cutoff)
                .order_by(job_runs.c.slot).limit(limit)
            )]
        return counts, waiting

    async def create_manual(
        self,
        job: Job,
        trigger: Trigger = Trigger.manual,
        *,
        actor: Actor | None = None,
        guard: Callable[[AsyncConnection], Awaitable[None]] | None = None,
    ) -> Run:
        """A run outside the schedule (`run-now`): its own key, the request instant.

        With `actor`, the audit log records it (`job.run`; `job.<trigger>` for others, e.g.
        `job.backfill`) in the same transaction. `guard(conn)` runs first in that transaction
        and may raise to refuse the run (the run-now rate quota does).
        """
        async with self.engine.begin() as conn:
            if guard is not None:
                await guard(conn)
            for _ in range(5):
                slot = utcnow()
                run_id = run_id_for(job.id, slot)
                row = (await conn.execute(
                    insert(job_runs)
                    .values(id=run_id, job_id=job.id, tenant=job.tenant, slug=job.slug, slot=slot,
                            trigger=trigger.value, status=RunStatus.scheduled.value)
                    .on_conflict_do_nothing()
                    .returning(job_runs)
                )).first()
                if row is not None:
                    if actor is not None:
                        action = "job.run" if trigger is Trigger.manual else f"job.{trigger.value}"
                        change = {"run_id": run_id, "trigger": trigger.value}
                        await record_by(conn, actor, action, f"job/{job.slug}", change)
                    return run_of(row)
        raise RuntimeError("could not allocate a run key")  # five clashes in a row: a clock bug

    async def record_backfill(
        self, job: Job, slots: Sequence[datetime], *, overlap: str | None = None, actor: Actor | None = None
    ) -> tuple[list[Run], int]:
        """Add a backfill run for each slot that the ledger does not hold yet (the slot is the
        run key: a slot that ran, runs or waits is left alone). A slot recorded `skipped` or
        `missed` never ran: its row becomes this backfill's run (kjob.store.overlap.RERUNNABLE).
        Returns the new runs, in slot order, and how many slots were already there. `overlap`
        overrides the job's overlap policy for these runs; with `actor`, the audit log records
        `job.backfill`."""
        if not slots:
            return [], 0
        values = [
            {"id": run_id_for(job.id, slot), "job_id": job.id, "tenant": job.tenant, "slug": job.slug, "slot": slot,
             "trigger": Trigger.backfill.value, "status": RunStatus.scheduled.value, "overlap": overlap}
            for slot in slots
        ]
        async with self.engine.begin() as conn:
            stmt = insert(job_runs).values(values)
            rows = (await conn.execute(
                stmt.on_conflict_do_update(index_elements=[job_runs.c.id], set_=rerun_values(stmt.excluded),
                                           where=job_runs.c.status.in_(RERUNNABLE))
                .returning(job_runs)
            )).all()
            if actor is not None:
                await record_by(conn, actor, "job.backfill", f"job/{job.slug}", {
                    "first_slot": utc_text(slots[0]), "last_slot": utc_text(slots[-1]), "slots": len(slots),
                    "queued": len(rows), "overlap": overlap,
                })
        new = sorted((run_of(r) for r in rows), key=lambda r: r.slot)
        return new, len(slots) - len(new)
