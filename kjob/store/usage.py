"""Agent usage and answers in the ledger (`run_usage`), one row per attempt that ran an agent.

The executor records what the agent reported before it records the attempt's end, so the
dispatcher, which only sees a run after its end, always finds the answer it sends. The cost of
an attempt whose claim was lost is recorded too: the tokens were spent all the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import and_, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob._time import utcnow
from kjob.model.agent_report import MAX_ANSWER_CHARS, AgentReport
from kjob.model.notify import answer_hash
from kjob.model.text import storable
from kjob.store.tables import job_runs, jobs, run_usage

USAGE_FIELDS = ("agent", "model", "tokens_in", "tokens_out", "cost_usd", "turns")


@dataclass(frozen=True)
class Answer:
    """What the dispatcher needs to send a run: the answer and the job's notify policy."""

    answer: str | None
    summary: str | None
    notify: bool | None
    policy: str
    quiet: str
    last_sent_hash: str | None
    last_sent_run: str | None


_BIGINT, _INT = 2**63 - 1, 2**31 - 1


def _within(count: int | None, top: int) -> int | None:
    """An agent's count as its column holds it: a report of 10**30 tokens is not a reason to
    refuse the attempt's end (which would run the agent again)."""
    return None if count is None else min(count, top)


def usage_row(*, tenant: str, job_id: UUID, agent: str, report: AgentReport) -> dict[str, Any]:
    """The `run_usage` columns of one attempt but its key (run_id, attempt): `UsageStore.record`
    writes them, or `ClaimLedger.finish` with the attempt's end.
    The agent's texts and counts as the store can hold them (kjob.model.text.storable)."""
    answer = storable(report.answer[:MAX_ANSWER_CHARS]) if report.answer is not None else None
    u = report.usage
    return dict(tenant=tenant, job_id=job_id, agent=agent, model=u.model and storable(u.model),
                tokens_in=_within(u.tokens_in, _BIGINT), tokens_out=_within(u.tokens_out, _BIGINT),
                cost_usd=u.cost_usd, turns=_within(u.turns, _INT), answer=answer,
                answer_hash=answer_hash(answer) if answer is not None else None,
                summary=report.summary and storable(report.summary), notify=report.notify)



class UsageStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def record(self, *, run_id: str, attempt: int, tenant: str, job_id: UUID, agent: str,
                     report: AgentReport) -> None:
        values = dict(run_id=run_id, attempt=attempt, **usage_row(tenant=tenant, job_id=job_id, agent=agent,
                                                                  report=report))
        stmt = insert(run_usage).values(**values)
        stmt = stmt.on_conflict_do_update(index_elements=["run_id", "attempt"],
                                          set_={k: stmt.excluded[k] for k in values if k not in ("run_id", "attempt")})
        async with self.engine.begin() as conn:
            await conn.execute(stmt)

    async def for_delivery(self, run_id: str, attempt: int, job_id: UUID) -> Answer:
        """The attempt's answer (None when no agent report was recorded: an older node, or the
        agent never started), the job's output policy and the last answer sent for the job."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(
                select(run_usage.c.answer, run_usage.c.summary, run_usage.c.notify)
                .where(run_usage.c.run_id == run_id, run_usage.c.attempt == attempt)
            )).first()
            output = (await conn.execute(select(jobs.c.spec["output"]).where(jobs.c.id == job_id))).scalar() or {}
            last = (await conn.execute(
                select(run_usage.c.answer_hash, job_runs.c.id)
                .join(job_runs, and_(job_runs.c.id == run_usage.c.run_id, job_runs.c.attempt == run_usage.c.attempt))
                .where(job_runs.c.job_id == job_id, job_runs.c.delivery_status == "delivered", job_runs.c.id != run_id)
                .order_by(job_runs.c.delivered_at.desc()).limit(1)
            )).first()
        return Answer(
            answer=row.answer if row else None, summary=row.summary if row else None,
            notify=row.notify if row else None,
            policy=output.get("notify", "always"), quiet=output.get("quiet", "NO_REPLY"),
            last_sent_hash=last.answer_hash if last else None, last_sent_run=last.id if last else None,
        )

    async def of_runs(self, run_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Each run's usage summed over its attempts (a retried run cost every attempt)."""
        if not run_ids:
            return {}
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(run_usage.c.run_id, func.max(run_usage.c.agent).label("agent"),
                       func.max(run_usage.c.model).label("model"),
                       func.sum(run_usage.c.tokens_in).label("tokens_in"),
                       func.sum(run_usage.c.tokens_out).label("tokens_out"),
                       func.sum(run_usage.c.cost_usd).label("cost_usd"), func.sum(run_usage.c.turns).label("turns"))
                .where(run_usage.c.run_id.in_(run_ids)).group_by(run_usage.c.run_id)
            )
            return {r.run_id: {k: _plain(getattr(r, k)) for k in USAGE_FIELDS} for r in rows}

    async def attempts(self, run_id: str) -> dict[int, dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(run_usage).where(run_usage.c.run_id == run_id))
            return {r.attempt: {k: _plain(getattr(r, k)) for k in USAGE_FIELDS} for r in rows}

    async def job_week(self, job_id: UUID, now: datetime | None = None) -> dict[str, Any]:
        """The job's usage over the last 7 days (`kjob inspect`)."""
        since = (now or utcnow()) - timedelta(days=7)
        async with self.engine.connect() as conn:
            r = (await conn.execute(
                select(func.count().label("attempts"), func.sum(run_usage.c.tokens_in).label("tokens_in"),
                       func.sum(run_usage.c.tokens_out).label("tokens_out"),
                       func.sum(run_usage.c.cost_usd).label("cost_usd"), func.sum(run_usage.c.turns).label("turns"))
                .where(run_usage.c.job_id == job_id, run_usage.c.recorded_at >= since)
            )).one()
        return {"days": 7, "attempts": r.attempts, "tokens_in": _plain(r.tokens_in), "tokens_out": _plain(r.tokens_out),
                "cost_usd": _plain(r.cost_usd), "turns": _plain(r.turns)}

    async def tenant_cost_since(self, tenant: str, since: datetime) -> float:
        async with self.engine.connect() as conn:
            total = (await conn.execute(
                select(func.coalesce(func.sum(run_usage.c.cost_usd), 0.0))
                .where(run_usage.c.tenant == tenant, run_usage.c.recorded_at >= since)
            )).scalar()
        return float(total or 0.0)


def _plain(value: Any) -> Any:
    # SUM over BIGINT comes back as Decimal; JSON wants a number.
    if value is None or isinstance(value, (str, float)):
        return value
    return int(value) if float(value).is_integer() and not isinstance(value, float) else float(value)
