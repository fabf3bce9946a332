"""The run ledger: `job_runs` and `run_attempts`, the source of truth for exactly-once.

The life of a run, and who moves it:

    ticker      record_slots()   -> scheduled      (ON CONFLICT DO NOTHING: a slot is one row)
                mark_published()
    executor    claim()          -> running        (only from scheduled/retrying, or a running
                                                    row whose claim expired: that attempt is lost)
                heartbeat()                        (extends the claim; False = claim lost, stop)
                finish()         -> retrying | succeeded | failed | timed_out | error
                                                    (only while the claim is still ours)
    dispatcher  mark_delivery()  -> delivered | failed (delivery status, apart from run status)

JetStream may deliver a due run twice; the conditional UPDATEs here make the second one a no-op.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Awaitable, Callable, Iterable, Sequence
from uuid import UUID

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kjob._time import utcnow
from kjob.errors import InvalidInput, NotFound
from kjob.model.job import Job, RetryPolicy
from kjob.model.run import (
    FINAL_STATUSES, AgentEnd, Attempt, DeliveryStatus, Run, RunStatus, Trigger, run_id_prefix, should_retry,
)
from kjob.store.audit import Actor, record_by
from kjob.store.database import raw_connection
from kjob.store.jobs import job_from_dict
from kjob.store.quotas import check_running
from kjob.store import overlap
from kjob.store.overlap import RERUNNABLE, Deferred, Skipped, rerun_values
from kjob.store.usage import USAGE_COLUMNS
from kjob.store.tables import job_dispatch_targets, job_runs, missed_ranges, run_attempts, run_logs

OPEN = (RunStatus.scheduled.value, RunStatus.running.value, RunStatus.retrying.value)


#: The fence row is read FOR SHARE: a successor's take_lease waits for a batch in flight, and
#: a batch that comes after it sees the new revision and writes nothing. Rows of jobs that are
#: gone, and `scheduled` rows of jobs disabled meanwhile, are left out (and returned as `gone`):
#: their FOR KEY SHARE lock also makes a delete or disable in flight finish first, so the
#: insert neither fails on the foreign key nor adds a slot to a job just disabled.
_RECORD_SLOTS_SQL = """
WITH fence AS (
    SELECT 1 FROM ticker_lease WHERE id = 1 AND revision = $12::bigint FOR SHARE
), given AS (
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::text[],
                         $8::text[], $9::bigint[], $10::timestamptz[], $11::text[])
        AS u(id, job_id, tenant, slug, slot, trigger, status, reason, leader_rev, finished_at, delivery_status)
), live AS (
    SELECT g.* FROM given g JOIN jobs j ON j.id = g.job_id
    WHERE g.status <> 'scheduled' OR j.enabled
    FOR KEY SHARE OF j
), inserted AS (
    INSERT INTO job_runs (id, job_id, tenant, slug, slot, trigger, status, reason, leader_rev, finished_at, delivery_status)
    SELECT * FROM live
    WHERE $12::bigint IS NULL OR EXISTS (SELECT 1 FROM fence)
    ON CONFLICT DO NOTHING
    RETURNING id
)
SELECT ($12::bigint IS NULL OR EXISTS (SELECT 1 FROM fence)) AS fenced_in, array(SELECT id FROM inserted) AS ids,
       array(SELECT id FROM given EXCEPT SELECT id FROM live) AS gone
"""

_RECORD_RANGES_SQL = """
WITH fence AS (
    SELECT 1 FROM ticker_lease WHERE id = 1 AND revision = $9::bigint FOR SHARE
), written AS (
    INSERT INTO missed_ranges (job_id, tenant, slug, first_slot, last_slot, count, count_exact, reason, leader_rev)
    SELECT u.* FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::bigint[],
                           $7::bool[], $8::text[], $10::bigint[]) AS u(job_id, tenant, slug, first_slot, last_slot,
                                                                     count, count_exact, reason, leader_rev)
    JOIN jobs j ON j.id = u.job_id
    WHERE $9::bigint IS NULL OR EXISTS (SELECT 1 FROM fence)
    ON CONFLICT (job_id, first_slot) DO UPDATE SET last_slot = EXCLUDED.last_slot, count = EXCLUDED.count,
        count_exact = EXCLUDED.count_exact, reason = EXCLUDED.reason, leader_rev = EXCLUDED.leader_rev,
        recorded_at = now()
    RETURNING 1
)
SELECT ($9::bigint IS NULL OR EXISTS (SELECT 1 FROM fence)) AS fenced_in, (SELECT count(*) FROM written) AS n
"""

_TAKE_LEASE_SQL = """
INSERT INTO ticker_lease (id, revision, node, acquired_at) VALUES (1, $1, $2, now())
ON CONFLICT (id) DO UPDATE SET revision = EXCLUDED.revision, node = EXCLUDED.node, acquired_at = now()
WHERE ticker_lease.revision < EXCLUDED.revision OR ticker_lease.acquired_at < now() - make_interval(secs => $3)
RETURNING revision
"""


_CLAIM_DELIVERY_SQL = """
UPDATE job_runs r SET claimed_by = $2, claim_until = now() + make_interval(secs => $3)
FROM (SELECT r2.id, t.channel FROM job_runs r2
      LEFT JOIN job_dispatch_targets t ON t.job_id = r2.job_id
      WHERE r2.id = $1 FOR UPDATE OF r2) x
WHERE r.id = x.id AND r.delivery_status = 'pending' AND r.status = ANY($4::text[])
  AND (r.claim_until IS NULL OR r.claim_until < now())
RETURNING r.*, x.channel
"""

FINAL_VALUES = tuple(s.value for s in FINAL_STATUSES)


#: A run's delivery once it ended: `pending` if its job posts results somewhere; a job whose
#: channel is `none` has nothing to deliver, which says so rather than `pending`.
_DELIVERY_AFTER_END = """CASE
            WHEN (SELECT kind FROM job_dispatch_targets t WHERE t.job_id = r.job_id) IN ('relay', 'webhook')
                THEN 'pending'
            ELSE 'none' END"""

_FINISH_SQL = """
WITH fin AS (
    UPDATE job_runs r SET
        status = $4, exit_code = $5, error = $6, reason = $7, output_excerpt = $8, output_bytes = $9,
        claimed_by = NULL, claim_until = NULL,
        -- the database's clock, as for claims: a node whose clock is off must not move retries
        next_attempt_at = CASE WHEN $10::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $10::float8) END,
        finished_at = CASE WHEN $10::float8 IS NULL THEN now() ELSE r.finished_at END,
        delivery_status = CASE WHEN $10::float8 IS NOT NULL THEN r.delivery_status ELSE """ + _DELIVERY_AFTER_END + """ END
    WHERE r.id = $1 AND r.claimed_by = $2 AND r.attempt = $3 AND r.status = 'running'
    RETURNING r.*
), attempt AS (
    -- By the parameters, not a join with `fin`: a join is planned from the statistics of an
    -- empty table (a new ledger), as a scan of every attempt ever made, once per run.
    UPDATE run_attempts a SET status = $11, finished_at = now(), exit_code = $5, reason = $7
    WHERE a.run_id = $1 AND a.attempt = $3 AND EXISTS (SELECT 1 FROM fin)
), log AS (
    INSERT INTO run_logs (run_id, output, output_bytes, dropped_bytes)
    SELECT fin.id, $12, $9, $13 FROM fin
    ON CONFLICT (run_id) DO UPDATE
        SET output = EXCLUDED.output, output_bytes = EXCLUDED.output_bytes, dropped_bytes = EXCLUDED.dropped_bytes
)
SELECT * FROM fin
"""

#: With the attempt's end, what its agent reported (kjob.store.usage), in the same statement:
#: the dispatcher, which only sees a run after its end, finds the answer it sends. Written
#: whether or not the claim still held: the tokens were spent all the same.
_FINISH_WITH_USAGE_SQL = _FINISH_SQL.replace("SELECT * FROM fin", """, usage AS (
    INSERT INTO run_usage (run_id, attempt, """ + ", ".join(c for c, _ in USAGE_COLUMNS) + """)
    SELECT $1, $3, """ + ", ".join(f"${14 + i}::{t}" for i, (_, t) in enumerate(USAGE_COLUMNS)) + """
    WHERE EXISTS (SELECT 1 FROM job_runs WHERE id = $1)
    ON CONFLICT (run_id, attempt) DO UPDATE SET """ + ", ".join(f"{c} = EXCLUDED.{c}" for c, _ in USAGE_COLUMNS) + """
)
SELECT * FROM fin""")


#: A lapsed claim is taken over only this fraction of the lease after it lapsed (its owner's
#: time to renew, or its watchdog's to write an end) and ...
TAKEOVER_GRACE = 0.5
#: ... only by a claim whose first statement came back within this fraction of the lease: one
#: that took longer may have waited out a stall of the database, during which the watchdog's
#: write waited too. It is tried again once the watchdog had its turn.
TAKEOVER_PROMPT = 1 / 6


#: The claim's first statement: the run if it is claimable, its job (read FOR SHARE: a disable
#: in flight commits first, or waits for this claim) and the job lock, taken before the row
#: locks. A run changed meanwhile (a duplicate's claim committed while we waited) is re-read as
#: it is now, and left out if no longer claimable. A lapsed claim is taken over only
#: `TAKEOVER_GRACE` of the lease after it lapsed: the owner stopped its agent before the lapse
#: (kjob.executor.executor.ClaimKeeper), and after a stall of the database this is its time to
#: renew, or to write the end of an attempt that ran to it, before anyone may run it again.
#: The database's clock only: claims written from each executor's own clock would let a node
#: whose clock runs ahead see live claims as expired, and steal them.
_CLAIM_LOCK_SQL = text("""
SELECT r.id, r.job_id, r.slot, r.status, r.attempt, r.tenant, r.lost_attempts, r.trigger, j.enabled,
       j.spec -> 'retries' AS retries, coalesce(r.overlap, j.spec ->> 'overlap', 'skip') AS policy, now() AS db_now,
       """ + overlap.job_lock_sql("r.job_id") + """ AS locked
FROM job_runs r JOIN jobs j ON j.id = r.job_id
WHERE r.id = :run_id AND (
    r.status = 'scheduled'
    OR (r.status = 'retrying' AND (r.next_attempt_at IS NULL OR r.next_attempt_at <= now()))
    OR (r.status = 'running' AND r.claim_until < now() - make_interval(secs => CAST(:lease AS float8) * CAST(:grace AS float8))))
FOR UPDATE OF r FOR SHARE OF j
""")

#: The claim itself, once the checks passed: the run row, the lost attempt (if any), the new
#: attempt and the job as it is now, in one round trip. With `:guard` (overlap `skip`, a first
#: attempt), only if no other run of the job is busy: this statement starts after the job lock
#: was taken, so it sees every claim of the job before it. No row: one is busy; `settle` decides.
_CLAIM_SQL = text("""
WITH claimed AS (
    UPDATE job_runs SET status = 'running', attempt = attempt + 1, lost_attempts = lost_attempts + :lost,
        claimed_by = :executor, claim_until = CAST(:now AS timestamptz) + make_interval(secs => CAST(:lease AS float8)),
        started_at = clock_timestamp(),  -- after the job lock: not before the end of a run it waited for
        next_attempt_at = NULL
    WHERE id = :run_id AND NOT (CAST(:guard AS bool) AND EXISTS (
        SELECT 1 FROM job_runs o WHERE o.job_id = job_runs.job_id AND o.id <> :run_id AND """ + overlap.BUSY_SQL + """))
    RETURNING *
), lost AS (
    UPDATE run_attempts a SET status = 'lost', finished_at = :now, reason = :reason
    WHERE :lost = 1 AND a.run_id = :run_id AND a.attempt = (SELECT claimed.attempt - 1 FROM claimed)
), attempt AS (
    INSERT INTO run_attempts (run_id, attempt, executor, status, started_at)
    SELECT id, attempt, :executor, 'running', started_at FROM claimed
    ON CONFLICT DO NOTHING
)
SELECT claimed.*, row_to_json(j)::text AS job FROM claimed JOIN jobs j ON j.id = claimed.job_id
""")


#: A lapsed claim whose agent had run to its end (its watchdog wrote the exit code): the claim
#: moves to the new executor for the same attempt, which concludes it without the agent.
_ADOPT_SQL = text("""
WITH adopted AS (
    UPDATE job_runs SET claimed_by = :executor, claim_until = now() + make_interval(secs => CAST(:lease AS float8))
    WHERE id = :run_id
    RETURNING *
)
SELECT adopted.*, row_to_json(j)::text AS job FROM adopted JOIN jobs j ON j.id = adopted.job_id
""")


_CLAIM_FIRST_SQL = "SELECT outcome, run_row, job_row FROM kjob_claim_first($1, $2, $3)"

#: The end of a run whose attempts were lost once too often (kjob.model.run.should_retry): an
#: agent that kills its node must not crash-loop the fleet.
_GIVE_UP_SQL = text("""
WITH ended AS (
    UPDATE job_runs r SET status = 'error', lost_attempts = lost_attempts + 1, claimed_by = NULL,
        claim_until = NULL, next_attempt_at = NULL, finished_at = :now, error = :reason, reason = :reason,
        delivery_status = """ + _DELIVERY_AFTER_END + """
    WHERE id = :run_id
    RETURNING r.*
), lost AS (
    UPDATE run_attempts a SET status = 'lost', finished_at = :now, reason = :lost_reason
    FROM ended WHERE a.run_id = ended.id AND a.attempt = ended.attempt
)
SELECT * FROM ended
""")

LOST_REASON = "executor stopped renewing its claim (it died or lost the database)"


@dataclass(frozen=True)
class GaveUp:
    """The run's last attempt was lost once too often: it ended now (`error`, with its reason)."""

    run: Run


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
    leader_rev: int | None = None


@dataclass(frozen=True)
class Claimed:
    """A run an executor now owns, with the job as it is at claim time."""

    run: Run
    job: Job
    #: The attempt before this one was lost (its executor died): recorded as such.
    previous_lost: bool
    #: Set when the claim was taken over from an executor whose agent had ended (its watchdog
    #: wrote the end): the same attempt, to conclude from this, without running the agent.
    ended: AgentEnd | None = None


@dataclass(frozen=True)
class TakeoverHeld:
    """A lapsed claim, not taken over now: the database was just away (the claim waited on it,
    or the executor's last statements failed). Its owner's watchdog may have the end of an agent
    that ran to write; after an outage it goes first (kjob.executor.watchdog). Nothing changed:
    ask again in `TAKEOVER_GRACE` of the lease."""


@dataclass(frozen=True)
class Delivery:
    run: Run
    channel: str


#: How many runs an ambiguous short id error names.
AMBIGUOUS_SHOWN = 3


def _claimed(row, **fields) -> Claimed:
    """A claim statement's row: the run, with its job as JSON."""
    mapping = dict(row._mapping)
    job = json.loads(mapping.pop("job"))
    return Claimed(run=Run.model_validate(mapping), job=job_from_dict(job), **fields)


def _run(row) -> Run:
    return Run.model_validate(dict(row._mapping))


class RunLedger:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # -- ticker -------------------------------------------------------------------------

    async def record_slots(self, rows: Sequence[SlotRow], fence: int | None = None) -> Recorded:
        """Insert slots; returns the run ids that were new (a slot already there is skipped)
        and those whose job is gone, or disabled for a slot that would run (not written).

        With `fence` (the ticker leader's revision), nothing is written unless `ticker_lease`
        still holds that revision, and Deposed is raised. One statement over arrays (`unnest`)
        whatever the batch size: the ticker writes thousands of slots a second.
        """
        if not rows:
            return Recorded(set(), set())
        now = utcnow()
        final = [r.status.final for r in rows]
        params = (
            [r.run_id for r in rows], [r.job_id for r in rows], [r.tenant for r in rows], [r.slug for r in rows],
            [r.slot for r in rows], [r.trigger.value for r in rows], [r.status.value for r in rows],
            [r.reason for r in rows], [r.leader_rev for r in rows], [now if f else None for f in final],
            [DeliveryStatus.none.value if f else DeliveryStatus.pending.value for f in final],
            fence,
        )
        async with raw_connection(self.engine) as raw:
            record = await raw.fetchrow(_RECORD_SLOTS_SQL, *params)
        if not record["fenced_in"]:
            raise Deposed(f"ticker revision {fence} no longer holds the ledger fence")
        return Recorded(set(record["ids"]), set(record["gone"]))

    async def record_missed_ranges(self, ranges: Sequence[MissedRangeRow], fence: int | None = None) -> int:
        """Write compact records of missed slots (kjob.model.catchup), under the fence as
        `record_slots`. A record with the same job and first slot is replaced: settling the
        same downtime twice (a crash in between) leaves one record. Returns how many."""
        if not ranges:
            return 0
        params = (
            [r.job_id for r in ranges], [r.tenant for r in ranges], [r.slug for r in ranges],
            [r.first for r in ranges], [r.last for r in ranges], [r.count for r in ranges],
            [r.exact for r in ranges], [r.reason for r in ranges], fence, [r.leader_rev for r in ranges],
        )
        async with self.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            record = await raw.driver_connection.fetchrow(_RECORD_RANGES_SQL, *params)
        if not record["fenced_in"]:
            raise Deposed(f"ticker revision {fence} no longer holds the ledger fence")
        return record["n"]

    async def missed_ranges(self, job_id: UUID, limit: int = 50) -> list[MissedRangeRow]:
        """The job's compact missed-slot records, newest first."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(missed_ranges).where(missed_ranges.c.job_id == job_id)
                .order_by(missed_ranges.c.first_slot.desc()).limit(limit)
            )
            return [MissedRangeRow(job_id=r.job_id, tenant=r.tenant, slug=r.slug, first=r.first_slot,
                                   last=r.last_slot, count=r.count, exact=r.count_exact, reason=r.reason,
                                   leader_rev=r.leader_rev) for r in rows]

    async def take_lease(self, revision: int, node: str, stale_after_s: float) -> bool:
        """Write a new leader's fencing token. False if a newer leader already holds it (or an
        older one renewed it within `stale_after_s`, which only happens if NATS lost the lease
        bucket and revisions restarted)."""
        async with raw_connection(self.engine) as raw:
            return await raw.fetchval(_TAKE_LEASE_SQL, revision, node, stale_after_s) is not None

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
            return [_run(r) for r in await conn.execute(stmt)]

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
            return [_run(r) for r in await conn.execute(stmt)]

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
            waiting = [_run(r) for r in await conn.execute(
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
        from kjob.model.run import run_id_for

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
                    return _run(row)
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
        from kjob.model.run import run_id_for, utc_text

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
        new = sorted((_run(r) for r in rows), key=lambda r: r.slot)
        return new, len(slots) - len(new)

    # -- executor -----------------------------------------------------------------------

    async def claim(
        self, run_id: str, executor: str, lease: timedelta, *, max_running: int | None = None,
        takeover: bool = True,
    ) -> Claimed | Skipped | Deferred | GaveUp | TakeoverHeld | None:
        """Take the run for one attempt, or None if it is not ours to run (done, owned, early).

        A lapsed claim is taken over (its attempt counted lost) only with `takeover` and when
        the database answered promptly; else TakeoverHeld, nothing changed.

        The job's overlap policy is applied here (kjob.store.overlap): Skipped, the run is now
        final as `skipped`; Deferred, it must wait for another run of its job to end. GaveUp:
        the claim found the run's attempt lost once more than its budget allows; it ended.

        :raises TenantBusy: `max_running` (the tenant's concurrency quota) other runs of the
            tenant are running; nothing changed, so the run can be claimed again later.
        """
        asked = time.monotonic()
        if max_running is None:
            # The common case in one round trip (migration 0009): a first attempt of an enabled
            # `skip` or `allow` job that nothing else of runs. The function answers `slow` for
            # the rest, left to the transaction below.
            async with raw_connection(self.engine) as raw:
                first = await raw.fetchrow(_CLAIM_FIRST_SQL, run_id, executor, lease.total_seconds())
            if first["outcome"] == "none":
                return None  # no such run
            if first["outcome"] == "claimed":
                return Claimed(run=Run.model_validate_json(first["run_row"]),
                               job=job_from_dict(json.loads(first["job_row"])), previous_lost=False)
        async with self.engine.begin() as conn:
            # Three statements: the run, its job and the job lock; the claim (with the `skip`
            # check in it); the commit. The other policies' checks, a quota and a busy job take
            # the longer way (kjob.store.overlap.settle).
            before = (await conn.execute(_CLAIM_LOCK_SQL, dict(run_id=run_id, lease=lease.total_seconds(), grace=TAKEOVER_GRACE))).first()
            answered = time.monotonic() - asked  # the claim's wait so far, this statement's included
            if before is None:
                return None  # no such run, or not ours to run (done, owned, early)
            now, policy = before.db_now, before.policy
            lost = before.status == RunStatus.running.value
            if lost:  # read after the lock: a watchdog writing this attempt's end went first
                ended = (await conn.execute(
                    select(run_attempts.c.agent_exit_code, run_attempts.c.agent_ended_at, run_attempts.c.executor)
                    .where(run_attempts.c.run_id == run_id, run_attempts.c.attempt == before.attempt,
                           run_attempts.c.agent_exit_code.is_not(None))
                )).first()
                if ended is not None:
                    row = (await conn.execute(_ADOPT_SQL, dict(
                        run_id=run_id, executor=executor, lease=lease.total_seconds()))).one()
                    return _claimed(row, previous_lost=False, ended=AgentEnd(
                        exit_code=ended.agent_exit_code, node=ended.executor, ended_at=ended.agent_ended_at))
                if not takeover or answered > lease.total_seconds() * TAKEOVER_PROMPT:
                    return TakeoverHeld()  # the transaction ends unwritten: the row lock goes
            if lost and not should_retry(RunStatus.lost, before.attempt, before.lost_attempts + 1,
                                         RetryPolicy.model_validate(before.retries or {})):
                reason = (f"gave up after {before.lost_attempts + 1} lost attempts: each time its executor "
                          "died or lost the database while the agent ran")
                row = (await conn.execute(_GIVE_UP_SQL, dict(
                    run_id=run_id, now=now, reason=reason, lost_reason=LOST_REASON))).one()
                return GaveUp(run=_run(row))
            first = before.status == RunStatus.scheduled.value
            if first and overlap.disabled_slot(before.enabled, before.trigger):
                return await overlap.skip_disabled(conn, run_id, now)
            guard = first and overlap.effective_policy(policy, before.trigger) == "skip" and max_running is None
            if first and not guard:
                held = await overlap.settle(conn, before, policy, run_id, now)
                if held is not None:
                    return held
            if max_running is not None:
                await check_running(conn, before.tenant, run_id, max_running)
            params = dict(run_id=run_id, executor=executor, lost=1 if lost else 0, lease=lease.total_seconds(),
                          now=now, reason=LOST_REASON)
            row = (await conn.execute(_CLAIM_SQL, dict(params, guard=guard))).first()
            if row is None:  # another run of the `skip` job is busy (or stopping): settle it
                held = await overlap.settle(conn, before, policy, run_id, now)
                if held is not None:
                    return held
                row = (await conn.execute(_CLAIM_SQL, dict(params, guard=False))).one()
        return _claimed(row, previous_lost=lost)

    async def heartbeat(self, run_id: str, executor: str, attempt: int, lease: timedelta) -> bool:
        """Extend our claim. False: the claim is no longer ours; stop the attempt."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(job_runs)
                .where(job_runs.c.id == run_id, job_runs.c.claimed_by == executor,
                       job_runs.c.attempt == attempt, job_runs.c.status == RunStatus.running.value)
                .values(claim_until=func.now() + lease)
            )
            return result.rowcount == 1

    async def stopped(self, run_id: str, executor: str, attempt: int) -> bool:
        """Confirm that our attempt, cancelled by the overlap policy `replace`, has stopped: the
        run that replaces it may start. False if the attempt was not cancelled (lost otherwise)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(job_runs)
                .where(job_runs.c.id == run_id, job_runs.c.claimed_by == executor, job_runs.c.attempt == attempt,
                       job_runs.c.status == RunStatus.cancelled.value)
                .values(claimed_by=None, claim_until=None)
            )
            if result.rowcount != 1:
                return False
            await conn.execute(
                update(run_attempts)
                .where(run_attempts.c.run_id == run_id, run_attempts.c.attempt == attempt,
                       run_attempts.c.finished_at.is_(None))
                .values(finished_at=utcnow())
            )
            return True

    async def failure_streak(self, job_id: UUID, length: int) -> bool:
        """Whether the job's last `length` runs that ran to an end (by slot) all failed. Runs
        that never ran (missed, skipped, cancelled) neither count nor break the streak."""
        ended = (RunStatus.succeeded.value, RunStatus.failed.value, RunStatus.timed_out.value, RunStatus.error.value)
        async with self.engine.connect() as conn:
            statuses = (await conn.execute(
                select(job_runs.c.status)
                .where(job_runs.c.job_id == job_id, job_runs.c.status.in_(ended))
                .order_by(job_runs.c.slot.desc()).limit(length)
            )).scalars().all()
        return len(statuses) == length and RunStatus.succeeded.value not in statuses

    async def finish(
        self,
        run_id: str,
        executor: str,
        attempt: int,
        *,
        status: RunStatus,
        exit_code: int | None,
        reason: str | None,
        output: str,
        output_bytes: int,
        dropped_bytes: int,
        retry_in_s: float | None,
        usage: dict | None = None,
        excerpt_chars: int = 4000,
    ) -> Run | None:
        """Record the attempt's end, if our claim still holds. None: it did not (someone else
        owns the run now, so this attempt's result is void and must not be reported).
        `retry_in_s`: the run is tried again this long after the database's now. `usage`: what
        the agent reported (kjob.store.usage.usage_row), written in the same statement."""
        run_status = RunStatus.retrying if retry_in_s is not None else status
        error = reason if status is not RunStatus.succeeded else None
        # One statement, outside an explicit transaction: the run, its attempt and its log change
        # together or not at all, in one round trip (this is on every run's path).
        async with raw_connection(self.engine) as raw:
            record = await raw.fetchrow(
                _FINISH_SQL if usage is None else _FINISH_WITH_USAGE_SQL,
                run_id, executor, attempt, run_status.value, exit_code, error, reason,
                output[:excerpt_chars], output_bytes, retry_in_s, status.value, output, dropped_bytes,
                *([] if usage is None else [usage[c] for c, _ in USAGE_COLUMNS]),
            )
        return None if record is None else Run.model_validate(dict(record))

    # -- dispatcher ---------------------------------------------------------------------

    async def delivery(self, run_id: str) -> Delivery | None:
        stmt = (
            select(job_runs, job_dispatch_targets.c.channel)
            .join(job_dispatch_targets, job_dispatch_targets.c.job_id == job_runs.c.job_id, isouter=True)
            .where(job_runs.c.id == run_id)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(stmt)).first()
        if row is None:
            return None
        mapping = dict(row._mapping)
        channel = mapping.pop("channel") or "none"
        return Delivery(run=Run.model_validate(mapping), channel=channel)

    async def claim_delivery(self, run_id: str, owner: str, lease_s: float) -> Delivery | None:
        """Take a finished run's pending delivery for `lease_s` seconds, or None if there is
        none, or another dispatcher is delivering it now. Two dispatchers holding the same result
        (a redelivery past the ack deadline) then never POST it at the same time. A finished
        run's claim columns are free: the executor clears them when it records the end."""
        async with raw_connection(self.engine) as raw:
            record = await raw.fetchrow(_CLAIM_DELIVERY_SQL, run_id, owner, lease_s, list(FINAL_VALUES))
        if record is None:
            return None
        mapping = dict(record)
        channel = mapping.pop("channel") or "none"
        return Delivery(run=Run.model_validate(mapping), channel=channel)

    async def mark_delivery(self, run_id: str, status: DeliveryStatus, error: str | None = None) -> None:
        values: dict = dict(delivery_status=status.value, delivery_error=error, claimed_by=None, claim_until=None,
                            delivery_attempts=job_runs.c.delivery_attempts + 1)
        if status is DeliveryStatus.delivered:
            values["delivered_at"] = func.now()
        async with self.engine.begin() as conn:
            await conn.execute(update(job_runs).where(job_runs.c.id == run_id).values(**values))

    async def count_delivery_attempt(self, run_id: str, error: str) -> int:
        async with self.engine.begin() as conn:
            return (await conn.execute(
                update(job_runs).where(job_runs.c.id == run_id)
                .values(delivery_attempts=job_runs.c.delivery_attempts + 1, delivery_error=error,
                        claimed_by=None, claim_until=None)
                .returning(job_runs.c.delivery_attempts)
            )).scalar_one()

    # -- readers (gateway) ----------------------------------------------------------------

    async def get(self, tenant: str, run_id: str) -> Run:
        """The tenant's run `run_id`, or the one run whose id starts with it (a short id).

        :raises NotFound: no run of the tenant has that id or prefix.
        :raises InvalidInput: (field `run_id`) the prefix starts several of the tenant's runs.
        """
        async with self.engine.connect() as conn:
            row = (await conn.execute(
                select(job_runs).where(job_runs.c.id == run_id, job_runs.c.tenant == tenant)
            )).first()
            prefix = run_id_prefix(run_id) if row is None else None
            if prefix is not None:
                rows = (await conn.execute(
                    select(job_runs).where(job_runs.c.id.like(f"{prefix}%"), job_runs.c.tenant == tenant)
                    .order_by(job_runs.c.id).limit(AMBIGUOUS_SHOWN)
                )).all()
                if len(rows) > 1:
                    many = "at least " if len(rows) == AMBIGUOUS_SHOWN else ""
                    shown = ", ".join(r.id[:12] for r in rows)
                    raise InvalidInput(f"{run_id!r} is the start of {many}{len(rows)} runs ({shown}); "
                                       "give more of the id", "run_id")
                row = rows[0] if rows else None
        if row is None:
            raise NotFound("run", run_id)
        return _run(row)

    async def list_for_job(self, job_id: UUID, limit: int = 50, before: datetime | None = None) -> list[Run]:
        """The job's runs, newest slot first; with `before`, only older slots (the next page)."""
        query = select(job_runs).where(job_runs.c.job_id == job_id)
        if before is not None:
            query = query.where(job_runs.c.slot < before)
        async with self.engine.connect() as conn:
            rows = await conn.execute(query.order_by(job_runs.c.slot.desc()).limit(limit))
            return [_run(r) for r in rows]

    async def attempts(self, run_id: str) -> list[Attempt]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(run_attempts).where(run_attempts.c.run_id == run_id).order_by(run_attempts.c.attempt)
            )
            return [Attempt.model_validate(dict(r._mapping)) for r in rows]

    async def log(self, tenant: str, run_id: str) -> tuple[str, int, int]:
        """(output, total bytes, dropped bytes) of the run's last attempt; empty if none yet."""
        run_id = (await self.get(tenant, run_id)).id  # a short id names the whole one
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(run_logs).where(run_logs.c.run_id == run_id))).first()
        if row is None:
            return "", 0, 0
        return row.output, row.output_bytes, row.dropped_bytes
