"""Per-tenant quotas: how many jobs, how often a schedule may fire, how often run-now, and how
many runs may execute at once. Limits come from the `[quotas]` settings, with optional
per-tenant overrides (`[quotas.tenants.<name>]` in config.toml); see docs/security.md.

Exceeding one is always an error the caller sees, never a silent drop:

    max_jobs              QuotaExceeded (409) on the write that would add a job
    min_interval_s        InvalidInput (422, field `schedule`) on the write of such a schedule
    run_now_per_minute    RateLimited (429, Retry-After) on the run-now request
    max_concurrent_runs   TenantBusy at the executor's claim: the due message comes back later
                          (`nak(delay)`) and the run stays `scheduled` until a slot frees up
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import islice

from sqlalchemy import ColumnElement, Table, func, literal, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kjob._time import utcnow
from kjob.config import QuotaSettings
from kjob.errors import InvalidInput, QuotaExceeded, RateLimited
from kjob.model.schedule import Schedule
from kjob.store.tables import audit_log, job_runs, jobs

#: The audit action of a run-now; the rate limit counts these rows.
RUN_NOW_ACTION = "job.run"
RATE_WINDOW = timedelta(minutes=1)
#: Waits of a due run refused by the concurrency quota: 1 s, 2 s, ... up to 15 s.
BUSY_RETRY_S = 1.0
BUSY_RETRY_MAX_S = 15.0
#: Slots looked at to find a cron schedule's shortest gap between two slots.
INTERVAL_SAMPLES = 100


@dataclass(frozen=True)
class Limits:
    """One tenant's effective limits."""

    max_jobs: int
    max_concurrent_runs: int | None
    min_interval: timedelta
    run_now_per_minute: int
    max_cost_usd_per_day: float | None = None


class TenantBusy(QuotaExceeded):
    """The tenant already has `limit` runs executing: try this run again later."""

    def __init__(self, tenant: str, limit: int) -> None:
        super().__init__(f"tenant {tenant!r} already has {limit} runs executing (its max_concurrent_runs quota)")
        self.tenant = tenant
        self.limit = limit


class Quotas:
    """The limits of every tenant, from settings."""

    def __init__(self, settings: QuotaSettings | None = None) -> None:
        self.settings = settings or QuotaSettings()

    def limits(self, tenant: str) -> Limits:
        s = self.settings
        own = s.tenants.get(tenant)

        def pick(name: str):
            value = getattr(own, name) if own is not None else None
            return value if value is not None else getattr(s, name)

        return Limits(
            max_jobs=pick("max_jobs"),
            max_concurrent_runs=pick("max_concurrent_runs"),
            min_interval=timedelta(seconds=pick("min_interval_s")),
            run_now_per_minute=pick("run_now_per_minute"),
            max_cost_usd_per_day=pick("max_cost_usd_per_day"),
        )


def shortest_gap(schedule: Schedule, tz: str, after: datetime) -> timedelta | None:
    """The shortest time between two consecutive slots of `schedule` (None for `@once`).

    For cron it is measured over the next INTERVAL_SAMPLES slots: a cron's tightest gap recurs
    within its first cycle of fields, which that many slots cover.
    """
    if schedule.interval is not None:
        return schedule.interval
    if schedule.is_once:
        return None
    slots = list(islice(schedule.slots(after, tz), INTERVAL_SAMPLES + 1))
    gaps = [b - a for a, b in zip(slots, slots[1:])]
    return min(gaps) if gaps else None


def check_interval(expr: str, tz: str, limits: Limits, now: datetime, field: str = "schedule") -> None:
    """Refuse a schedule that fires more often than the tenant's minimum interval."""
    gap = shortest_gap(Schedule.parse(expr), tz, now)
    if gap is not None and gap < limits.min_interval:
        raise InvalidInput(
            f"fires as often as every {_seconds(gap)}, more often than this tenant's minimum interval of "
            f"{_seconds(limits.min_interval)}; choose a slower schedule",
            field,
        )


async def check_job_count(engine: AsyncEngine, tenant: str, adding: int, limits: Limits) -> None:
    """Refuse adding `adding` jobs if the tenant would then have more than `max_jobs`."""
    if adding <= 0:
        return
    async with engine.connect() as conn:
        count = await _count(conn, jobs, jobs.c.tenant == tenant)
    if count + adding > limits.max_jobs:
        raise QuotaExceeded(
            f"tenant {tenant!r} has {count} jobs and may have at most {limits.max_jobs} (its max_jobs quota); "
            "delete jobs it no longer needs, or ask the operator for a higher quota"
        )


async def _tenant_lock(conn: AsyncConnection, purpose: str, tenant: str) -> None:
    """Serialise, until the transaction ends, the transactions that check one tenant's quota."""
    key = func.hashtextextended(literal(f"kjob.{purpose}:") + literal(tenant), 0)
    await conn.execute(select(func.pg_advisory_xact_lock(key)))


async def check_run_now_rate(conn: AsyncConnection, tenant: str, limits: Limits) -> None:
    """Inside the run-now's own transaction (which writes its audit row): refuse it if the
    tenant already made `run_now_per_minute` run-now requests in the last minute."""
    await _tenant_lock(conn, "run_now", tenant)
    since = utcnow() - RATE_WINDOW
    count, oldest = (
        await conn.execute(
            select(func.count(), func.min(audit_log.c.at)).where(
                audit_log.c.tenant == tenant, audit_log.c.action == RUN_NOW_ACTION, audit_log.c.at > since
            )
        )
    ).one()
    if count >= limits.run_now_per_minute:
        retry = (oldest - since).total_seconds() if oldest is not None else RATE_WINDOW.total_seconds()
        raise RateLimited(
            f"tenant {tenant!r} may start {limits.run_now_per_minute} runs per minute with run-now "
            f"(its run_now_per_minute quota); try again in {max(retry, 1):.0f}s",
            retry_after_s=retry,
        )


async def check_running(conn: AsyncConnection, tenant: str, run_id: str, limit: int) -> None:
    """Inside an executor's claim: raise TenantBusy if `limit` other runs of the tenant are
    running. The lock makes concurrent claims of one tenant count one after the other."""
    await _tenant_lock(conn, "running", tenant)
    running = await _count(conn, job_runs, job_runs.c.tenant == tenant, job_runs.c.status == "running",
                           job_runs.c.id != run_id)
    if running >= limit:
        raise TenantBusy(tenant, limit)


def busy_retry_delay(num_delivered: int | None) -> float:
    """How long a due run of a tenant at its concurrency quota waits before it is tried again:
    longer the more often it was refused, so a deep backlog does not hammer the database."""
    return min(BUSY_RETRY_S * max(num_delivered or 1, 1), BUSY_RETRY_MAX_S)


async def usage(engine: AsyncEngine, tenant: str) -> dict[str, int]:
    """What the tenant uses of each quota now."""
    since = utcnow() - RATE_WINDOW
    async with engine.connect() as conn:
        return {
            "jobs": await _count(conn, jobs, jobs.c.tenant == tenant),
            "concurrent_runs": await _count(conn, job_runs, job_runs.c.tenant == tenant, job_runs.c.status == "running"),
            "run_now_last_minute": await _count(
                conn, audit_log,
                audit_log.c.tenant == tenant, audit_log.c.action == RUN_NOW_ACTION, audit_log.c.at > since,
            ),
        }


async def _count(conn: AsyncConnection, table: Table, *where: ColumnElement[bool]) -> int:
    return (await conn.execute(select(func.count()).select_from(table).where(*where))).scalar_one()


def _seconds(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    return f"{seconds:g}s"
