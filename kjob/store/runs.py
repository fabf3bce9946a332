"""The run ledger's read side, for the API. The ledger (`job_runs`, `run_attempts`) is the
source of truth for exactly-once; each role that moves a run writes through its own module:

    ticker, run-now, backfill   kjob.store.slots        a slot is one row (ON CONFLICT DO NOTHING)
                                                        -> scheduled
    executor                    kjob.store.claims       who runs it: the claim, one attempt at a
                                                        time -> running -> retrying | succeeded |
                                                        failed | timed_out | error
    dispatcher                  kjob.store.deliveries   its result: pending -> delivered | failed

JetStream may deliver a message twice; the conditional UPDATEs make the second one a no-op.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob.errors import InvalidInput, NotFound
from kjob.model.run import Attempt, MissReason, Run, run_id_prefix
from kjob.store._run_rows import run_of
from kjob.store.slots import MissedRangeRow
from kjob.store.tables import job_runs, missed_ranges, run_attempts, run_logs

#: How many runs an ambiguous short id error names.
AMBIGUOUS_SHOWN = 3


class RunReads:
    """What the API shows of runs: one run, a job's runs and missed slots, attempts, logs."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

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
        return run_of(row)

    async def list_for_job(self, job_id: UUID, limit: int = 50, before: datetime | None = None) -> list[Run]:
        """The job's runs, newest slot first; with `before`, only older slots (the next page)."""
        query = select(job_runs).where(job_runs.c.job_id == job_id)
        if before is not None:
            query = query.where(job_runs.c.slot < before)
        async with self.engine.connect() as conn:
            rows = await conn.execute(query.order_by(job_runs.c.slot.desc()).limit(limit))
            return [run_of(r) for r in rows]

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

    async def missed_ranges(self, job_id: UUID, limit: int = 50) -> list[MissedRangeRow]:
        """The job's compact missed-slot records, newest first."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(missed_ranges).where(missed_ranges.c.job_id == job_id)
                .order_by(missed_ranges.c.first_slot.desc()).limit(limit)
            )
            return [MissedRangeRow(job_id=r.job_id, tenant=r.tenant, slug=r.slug, first=r.first_slot,
                                   last=r.last_slot, count=r.count, exact=r.count_exact, reason=r.reason,
                                   reason_code=r.reason_code and MissReason(r.reason_code), leader_rev=r.leader_rev)
                    for r in rows]
