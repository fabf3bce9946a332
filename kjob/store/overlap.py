"""The overlap policy, enforced where a run starts: inside the executor's claim transaction.

`ClaimLedger.claim` takes the job lock first (`job_lock_sql`), so the claims of one job's runs
happen one after the other (two executors claiming two slots of a `skip` job at once cannot both start), then
`settle` once it holds the run's row. What each policy does is stated in
`kjob.model.policies.OverlapPolicy`. A run is *busy* when it is `running` or `retrying`, or
`cancelled` by `replace` while its executor has not yet confirmed the sandbox stopped.

Only a run's first attempt is checked: a retry, or the re-claim of an attempt whose executor
died, continues a run that was already let in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from kjob.model.policies import replaced_reason, skipped_reason
from kjob.model.run import DeliveryStatus, MissReason, Run, RunStatus, Trigger
from kjob.store.tables import job_runs, run_attempts


@dataclass(frozen=True)
class Skipped:
    """The run did not start (overlap `skip`): it is final now, `skipped`, with its reason."""

    run: Run


@dataclass(frozen=True)
class Deferred:
    """The run may not start yet (overlap `queue`, or `replace` while the run it cancelled
    stops). Nothing changed: try again later (kjob.model.policies.defer_delay)."""

    reason: str


_BUSY = or_(
    job_runs.c.status.in_([RunStatus.running.value, RunStatus.retrying.value]),
    and_(job_runs.c.status == RunStatus.cancelled.value, job_runs.c.claimed_by.is_not(None)),
)


#: `_BUSY` in SQL, for a row `o` of another run of the job: the claim's own check of `skip`.
BUSY_SQL = "(o.status IN ('running', 'retrying') OR (o.status = 'cancelled' AND o.claimed_by IS NOT NULL))"


def job_lock_sql(job_id: str) -> str:
    """SQL that holds the job lock of `job_id` (a column or parameter) until the transaction
    ends: the claim reads the run, its job and this lock in one statement."""
    return f"pg_advisory_xact_lock(hashtextextended('kjob.job:' || CAST({job_id} AS text), 0))"


DISABLED_REASON = "the job was disabled before this slot started"


def disabled_slot(enabled: bool, trigger: str) -> bool:
    """A slot the ticker wrote, of a job that is disabled now: it does not start (it is final
    as `skipped`, with the reason). The claim reads the job row FOR SHARE, so a disable in
    flight commits first (and is seen) or waits for the claim: once `disable` returns, no slot
    of the job starts. Manual runs and backfills run on a disabled job, as asked."""
    return not enabled and trigger in (Trigger.schedule.value, Trigger.catchup.value)


async def skip_disabled(conn: AsyncConnection, run_id: str, now: datetime) -> Skipped:
    """Make the scheduled run `run_id` of a disabled job final as `skipped`, saying why."""
    skipped = (await conn.execute(
        update(job_runs).where(job_runs.c.id == run_id)
        .values(status=RunStatus.skipped.value, reason=DISABLED_REASON, reason_code=MissReason.job_gone.value,
                finished_at=now, delivery_status=DeliveryStatus.none.value)
        .returning(job_runs)
    )).one()
    return Skipped(Run.model_validate(dict(skipped._mapping)))


async def settle(conn: AsyncConnection, before: Any, policy: str, new_run_id: str, now: datetime) -> Skipped | Deferred | None:
    """Apply `policy` to the run `before` (its locked row: id, job_id, slot, status, trigger)
    before it starts. None: it may start now (any run it replaces is cancelled in this
    transaction)."""
    if policy == "allow" or before.status != RunStatus.scheduled.value:
        return None
    policy = effective_policy(policy, before.trigger)
    waiting = and_(job_runs.c.status == RunStatus.scheduled.value, job_runs.c.slot < before.slot)
    query = (
        select(job_runs.c.id, job_runs.c.status, job_runs.c.claim_until, job_runs.c.attempt)
        .where(job_runs.c.job_id == before.job_id, job_runs.c.id != new_run_id,
               or_(_BUSY, waiting) if policy == "queue" else _BUSY)
        .order_by(job_runs.c.slot)
    )
    if policy == "replace":
        query = query.with_for_update()
    others = (await conn.execute(query)).all()
    gone = [o for o in others if _stale_stop(o, now)]
    if gone:
        await _forget_stopping(conn, [o.id for o in gone], now)
    others = [o for o in others if not _stale_stop(o, now)]
    if not others:
        return None
    first = others[0]
    if policy == "skip":
        row = (await conn.execute(
            update(job_runs).where(job_runs.c.id == new_run_id)
            .values(status=RunStatus.skipped.value, reason=skipped_reason(first.id),
                    reason_code=MissReason.overlap.value, finished_at=now, delivery_status=DeliveryStatus.none.value)
            .returning(job_runs)
        )).one()
        return Skipped(Run.model_validate(dict(row._mapping)))
    if policy == "queue":
        return Deferred(f"waiting for run {first.id} ({first.status})")
    return await _replace(conn, others, new_run_id, now)


#: Final statuses of slots that never ran: a backfill of the slot runs it after all.
RERUNNABLE = (RunStatus.skipped.value, RunStatus.missed.value)


def rerun_values(new: Any) -> dict[str, Any]:
    """The columns a backfill sets on a `RERUNNABLE` row (`new`: the inserted row, e.g.
    `excluded`): a fresh run of the same slot and key, as if the slot had never been settled."""
    return dict(trigger=new.trigger, status=new.status, overlap=new.overlap, reason=None, reason_code=None, error=None,
                exit_code=None, finished_at=None, started_at=None, published_at=None, claimed_by=None, claim_until=None,
                next_attempt_at=None, lost_attempts=0, delivery_status=DeliveryStatus.pending.value,
                delivery_attempts=0, delivery_error=None, delivered_at=None, output_excerpt=None, output_bytes=None)


def effective_policy(policy: str, trigger: str) -> str:
    """`skip` keeps a slot from starting while the job still runs; the slots a user asked for
    as a range (a backfill) or the catch-up rule chose after downtime are each meant to run,
    so under `skip` they wait their turn (`queue`) instead of skipping one another
    (kjob.model.policies.OverlapPolicy)."""
    if policy == "skip" and trigger in (Trigger.backfill.value, Trigger.catchup.value):
        return "queue"
    return policy


async def _replace(conn: AsyncConnection, others: list[Any], new_run_id: str, now: datetime) -> Deferred | None:
    """Cancel every busy run of the job. A run whose sandbox is alive (its executor's claim
    holds) keeps its claim until that executor confirms the stop (`ClaimLedger.stopped`): the new
    run waits for that, so the two never run at once."""
    reason = replaced_reason(new_run_id)
    stopping = [o for o in others if o.status == RunStatus.cancelled.value]
    live = [o for o in others if o.status == RunStatus.running.value and o.claim_until >= now]
    idle = [o for o in others if o not in stopping and o not in live]
    cancel = dict(status=RunStatus.cancelled.value, reason=reason, finished_at=now, next_attempt_at=None,
                  delivery_status=DeliveryStatus.none.value)
    if live:
        ids = [o.id for o in live]
        await conn.execute(update(job_runs).where(job_runs.c.id.in_(ids)).values(**cancel))
        await _end_attempts(conn, live, reason, finished_at=None)
    if idle:
        ids = [o.id for o in idle]
        await conn.execute(update(job_runs).where(job_runs.c.id.in_(ids))
                           .values(**cancel, claimed_by=None, claim_until=None))
        await _end_attempts(conn, [o for o in idle if o.status == RunStatus.running.value], reason, finished_at=now)
    if live or stopping:
        return Deferred(f"waiting for run {(live or stopping)[0].id}, which it replaces, to stop")
    return None


async def _end_attempts(conn: AsyncConnection, runs: list[Any], reason: str, finished_at: datetime | None) -> None:
    for o in runs:
        await conn.execute(
            update(run_attempts)
            .where(run_attempts.c.run_id == o.id, run_attempts.c.attempt == o.attempt)
            .values(status=RunStatus.cancelled.value, reason=reason, finished_at=finished_at)
        )


def _stale_stop(other: Any, now: datetime) -> bool:
    """A cancelled run whose executor let its claim lapse without confirming the stop: gone."""
    return other.status == RunStatus.cancelled.value and (other.claim_until is None or other.claim_until < now)


async def _forget_stopping(conn: AsyncConnection, run_ids: list[str], now: datetime) -> None:
    await conn.execute(update(job_runs).where(job_runs.c.id.in_(run_ids)).values(claimed_by=None, claim_until=None))
    await conn.execute(update(run_attempts)
                       .where(run_attempts.c.run_id.in_(run_ids), run_attempts.c.finished_at.is_(None))
                       .values(finished_at=now))
