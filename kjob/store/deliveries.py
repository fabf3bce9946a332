"""The deliveries of the run ledger: what happens to a finished run's result, kept apart from
the run's status (kjob.model.run.DeliveryStatus). The dispatcher claims a pending delivery,
POSTs it, and records the outcome here: `delivered`, `failed`, `suppressed`, or one more attempt.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob.model.run import DeliveryStatus, Run
from kjob.store._run_rows import FINAL_VALUES
from kjob.store.database import raw_connection
from kjob.store.tables import job_dispatch_targets, job_runs

#: A finished run's pending delivery, for `lease_s` seconds: a run's claim columns are free once
#: it ended, so the delivery's claim reuses them.
_CLAIM_DELIVERY_SQL = """
UPDATE job_runs r SET claimed_by = $2, claim_until = now() + make_interval(secs => $3)
FROM (SELECT r2.id, t.channel FROM job_runs r2
      LEFT JOIN job_dispatch_targets t ON t.job_id = r2.job_id
      WHERE r2.id = $1 FOR UPDATE OF r2) x
WHERE r.id = x.id AND r.delivery_status = 'pending' AND r.status = ANY($4::text[])
  AND (r.claim_until IS NULL OR r.claim_until < now())
RETURNING r.*, x.channel
"""


@dataclass(frozen=True)
class Delivery:
    """A run with the channel its job posts results to (`none` if it has no target)."""

    run: Run
    channel: str


def _delivery(mapping: dict) -> Delivery:
    """A `job_runs` row joined with its target's `channel`."""
    channel = mapping.pop("channel") or "none"
    return Delivery(run=Run.model_validate(mapping), channel=channel)


class DeliveryLedger:
    """The dispatcher's side of the ledger: a finished run's delivery, claimed and recorded."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def delivery(self, run_id: str) -> Delivery | None:
        """The run and its job's channel as they are now; None if there is no such run."""
        stmt = (
            select(job_runs, job_dispatch_targets.c.channel)
            .join(job_dispatch_targets, job_dispatch_targets.c.job_id == job_runs.c.job_id, isouter=True)
            .where(job_runs.c.id == run_id)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(stmt)).first()
        if row is None:
            return None
        return _delivery(dict(row._mapping))

    async def claim_delivery(self, run_id: str, owner: str, lease_s: float) -> Delivery | None:
        """Take a finished run's pending delivery for `lease_s` seconds, or None if there is
        none, or another dispatcher is delivering it now. Two dispatchers holding the same result
        (a redelivery past the ack deadline) then never POST it at the same time. A finished
        run's claim columns are free: the executor clears them when it records the end."""
        async with raw_connection(self.engine) as raw:
            record = await raw.fetchrow(_CLAIM_DELIVERY_SQL, run_id, owner, lease_s, list(FINAL_VALUES))
        if record is None:
            return None
        return _delivery(dict(record))

    async def mark_delivery(self, run_id: str, status: DeliveryStatus, error: str | None = None) -> None:
        """Record the delivery's outcome (one more attempt) and free its claim."""
        values: dict = dict(delivery_status=status.value, delivery_error=error, claimed_by=None, claim_until=None,
                            delivery_attempts=job_runs.c.delivery_attempts + 1)
        if status is DeliveryStatus.delivered:
            values["delivered_at"] = func.now()
        async with self.engine.begin() as conn:
            await conn.execute(update(job_runs).where(job_runs.c.id == run_id).values(**values))

    async def count_delivery_attempt(self, run_id: str, error: str) -> int:
        """Count a failed attempt that will be tried again, and free the claim; returns how
        many attempts the delivery has had."""
        async with self.engine.begin() as conn:
            return (await conn.execute(
                update(job_runs).where(job_runs.c.id == run_id)
                .values(delivery_attempts=job_runs.c.delivery_attempts + 1, delivery_error=error,
                        claimed_by=None, claim_until=None)
                .returning(job_runs.c.delivery_attempts)
            )).scalar_one()
