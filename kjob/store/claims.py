"""The claims of the run ledger: which executor runs a slot, one attempt at a time.

The claim, not the JetStream ack, decides who runs a run: JetStream may deliver a due run twice,
and the conditional UPDATEs here make the second claim a no-op.

    claim()      scheduled | retrying -> running   (or a running row whose claim expired: that
                                                    attempt is lost; overlap policy applied here)
    heartbeat()                                    (extends the claim; False = claim lost, stop)
    stopped()                                      (a `replace`d attempt has stopped)
    finish()     running -> retrying | succeeded | failed | timed_out | error
                                                   (only while the claim is still ours)
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from dataclasses import dataclass
from datetime import timedelta
from uuid import UUID

import asyncpg
from sqlalchemy import Row, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob._time import utcnow
from kjob.model.job import Job, RetryPolicy
from kjob.model.text import storable
from kjob.model.run import AgentEnd, MissReason, Run, RunStatus, should_retry
from kjob.store import overlap
from kjob.store._batch import Batched
from kjob.store._run_rows import run_of
from kjob.store.database import raw_connection
from kjob.store.jobs import job_from_dict
from kjob.store.overlap import Deferred, Skipped
from kjob.store.quotas import check_running
from kjob.store.tables import BATCH_MAX, DELIVERY_AFTER_END, job_runs, run_attempts


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


_CLAIM_MANY_SQL = "SELECT run_id, outcome, run_row, job_row FROM kjob_claim_many($1::text[], $2, $3)"
#: No run has this id (run ids are UUIDs): `warm_up` claims it.
_WARM_UP_RUN = "kjob-warm-up"
_CLAIM_FIRST_WARM_UP_SQL = "SELECT outcome FROM kjob_claim_first($1, 'kjob-warm-up', 1)"
#: The answer for a run `kjob_claim_many` did not find.
_NO_RUN = ("none", None, None)


def _refused(sqlstate: str, message: str) -> Exception:
    """The error the database gave one item of a batch, as asyncpg raises it for a statement
    of its own (kjob.store.database.is_transient tells a deadlock from a refusal)."""
    return asyncpg.PostgresError.new({"C": sqlstate, "M": message})


#: A scheduled run and its job, read (never locked) for a warm start ahead of the claim.
_PEEK_SQL = ("SELECT row_to_json(r)::text AS run_row, row_to_json(j)::text AS job_row FROM job_runs r "
             "JOIN jobs j ON j.id = r.job_id WHERE r.id = $1 AND r.status = 'scheduled' AND j.enabled")

#: The end of a run whose attempts were lost once too often (kjob.model.run.should_retry): an
#: agent that kills its node must not crash-loop the fleet.
_GIVE_UP_SQL = text("""
WITH ended AS (
    UPDATE job_runs r SET status = 'error', lost_attempts = lost_attempts + 1, claimed_by = NULL,
        claim_until = NULL, next_attempt_at = NULL, finished_at = :now, error = :reason, reason = :reason,
        delivery_status = """ + DELIVERY_AFTER_END + """
    WHERE id = :run_id
    RETURNING r.*
), lost AS (
    UPDATE run_attempts a SET status = 'lost', finished_at = :now, reason = :lost_reason
    FROM ended WHERE a.run_id = ended.id AND a.attempt = ended.attempt
)
SELECT * FROM ended
""")

LOST_REASON = "executor stopped renewing its claim (it died or lost the database)"


_FINISH_MANY_SQL = "SELECT run_id, error_state, error_message, run_row FROM kjob_finish_many($1::jsonb)"


@dataclass(frozen=True)
class GaveUp:
    """The run's last attempt was lost once too often: it ended now (`error`, with its reason)."""

    run: Run



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



@functools.lru_cache(maxsize=2048)
def job_of_row(text: str) -> Job:
    """The Job of a jobs row as JSON text (`row_to_json(jobs)`), parsed once per distinct
    text: every slot of a job claims the same row until the job changes, and parsing it
    (JSON, then pydantic) was a tenth of a claim's CPU. Jobs are frozen, so sharing is safe."""
    return job_from_dict(json.loads(text))


def _claimed(row: Row, **fields) -> Claimed:
    """A claim statement's row: the run, with its job as JSON."""
    mapping = dict(row._mapping)
    job = job_of_row(mapping.pop("job"))
    return Claimed(run=Run.model_validate(mapping), job=job, **fields)


class ClaimLedger:
    """The executor's side of the ledger: claims, their renewal and the attempts' ends."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        #: (executor, lease) -> the first claims asked for at once, gathered into one statement.
        self._first: dict[tuple[str, float], Batched[str, tuple]] = {}
        #: The ends of attempts recorded at once, likewise.
        self._ends: Batched[str, Run | None] = Batched(self._finish_many, missing=None, max_size=BATCH_MAX)

    async def warm_up(self, connections: int = 4) -> None:
        """Call the claim and end functions once on each of `connections` pooled connections,
        for a run that does not exist: the first call on a session compiles the functions and
        plans their statements (about 5 ms measured), which a herd's first run, due at its
        instant on a fresh executor, would otherwise wait for. Changes nothing."""
        together = asyncio.Barrier(connections)  # each keeps its connection until all have one

        async def one() -> None:
            async with raw_connection(self.engine) as raw:
                await raw.fetch(_CLAIM_MANY_SQL, [_WARM_UP_RUN], _WARM_UP_RUN, 1.0)
                await raw.fetch(_CLAIM_FIRST_WARM_UP_SQL, _WARM_UP_RUN)
                await raw.fetch(_FINISH_MANY_SQL, "[]")
                await together.wait()

        async with asyncio.timeout(10):  # one that fails leaves the others at the barrier
            await asyncio.gather(*(one() for _ in range(connections)))

    def _claim_first(self, executor: str, lease_s: float) -> Batched[str, tuple]:
        batched = self._first.get((executor, lease_s))
        if batched is None:
            async def claim_many(batch: dict[str, None]) -> dict[str, tuple | Exception]:
                async with raw_connection(self.engine) as raw:
                    rows = await raw.fetch(_CLAIM_MANY_SQL, list(batch), executor, lease_s)
                return {row["run_id"]: _refused(row["run_row"], row["job_row"]) if row["outcome"] == "error"
                        else (row["outcome"], row["run_row"], row["job_row"]) for row in rows}
            batched = self._first[(executor, lease_s)] = Batched(claim_many, missing=_NO_RUN, max_size=BATCH_MAX)
        return batched

    async def _finish_many(self, batch: dict[str, dict]) -> dict[str, Run | None | Exception]:
        async with raw_connection(self.engine) as raw:
            rows = await raw.fetch(_FINISH_MANY_SQL, json.dumps(list(batch.values()), default=str))
        return {row["run_id"]: _refused(row["error_state"], row["error_message"]) if row["error_state"]
                else Run.model_validate_json(row["run_row"]) if row["run_row"] else None for row in rows}

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
            # The common case in one round trip (migrations 0009, 0012), with the other claims
            # asked for meanwhile: a first attempt of an enabled `skip` or `allow` job that
            # nothing else of runs. The function answers `slow` for the rest, left to the
            # transaction below.
            outcome, run_row, job_row = await self._claim_first(executor, lease.total_seconds())(run_id)
            if outcome == "none":
                return None  # no such run
            if outcome == "claimed":
                return Claimed(run=Run.model_validate_json(run_row), job=job_of_row(job_row), previous_lost=False)
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
                return GaveUp(run=run_of(row))
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

    async def peek(self, run_id: str) -> tuple[Run, Job] | None:
        """A scheduled run of an enabled job, and the job, as they are now: what a warm start
        builds its sandbox from. Nothing is claimed; the claim decides, and may see another job
        (an unchanged row gives the very same Job: `job_of_row`)."""
        async with raw_connection(self.engine) as raw:
            row = await raw.fetchrow(_PEEK_SQL, run_id)
        if row is None:
            return None
        return Run.model_validate_json(row["run_row"]), job_of_row(row["job_row"])

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
        reason_code: MissReason | None = None,
    ) -> Run | None:
        """Record the attempt's end, if our claim still holds. None: it did not (someone else
        owns the run now, so this attempt's result is void and must not be reported).
        `retry_in_s`: the run is tried again this long after the database's now. `usage`: what
        the agent reported (kjob.store.usage.usage_row), written in the same statement.
        `reason_code`: for a run that ends `skipped` without running (the cost cap)."""
        run_status = RunStatus.retrying if retry_in_s is not None else status
        # What the agent printed, as the store can hold it: an end refused for a NUL byte
        # would leave the claim to lapse and the agent to run again.
        output, reason = storable(output), reason and storable(reason)
        error = reason if status is not RunStatus.succeeded else None
        # One statement, outside an explicit transaction, with the other ends recorded meanwhile
        # (kjob_finish_many): the run, its attempt and its log change together or not at all.
        return await self._ends(run_id, dict(
            run_id=run_id, executor=executor, attempt=attempt, run_status=run_status.value,
            exit_code=exit_code, error=error, reason=reason, output_excerpt=output[:excerpt_chars],
            output_bytes=output_bytes, retry_in_s=retry_in_s, attempt_status=status.value,
            output=output, dropped_bytes=dropped_bytes, reason_code=reason_code and reason_code.value, usage=usage))

    async def run(self, run_id: str) -> Run | None:
        """The run as the ledger holds it now (None: no such run; its job was deleted)."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(job_runs).where(job_runs.c.id == run_id))).first()
        return None if row is None else run_of(row)
