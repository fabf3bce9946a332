"""Shared pieces of the ticker's fault tests: a node whose sandboxes reach the recorder, API
clients, and the ledger read back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from kjob.config import ExecutorSettings, TickerSettings
from kjob.model.schedule import Schedule
from kjob.store.tables import job_runs, missed_ranges
from tests.support.pipeline import fast_settings, node_clients
from tests.support.recorder import Recorder


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    with Recorder() as rec:
        yield rec


def node_settings(tmp_path, rec: Recorder, executor: dict | None = None, **ticker):
    """A node on the process sandbox whose agents report their executions to `rec`. The lease
    is longer than production's: the whole node shares the test's event loop on a loaded
    machine, and these tests are about job changes and downtime, not failover."""
    executor = ExecutorSettings(**{"heartbeat_s": 0.5, "claim_lease_s": 6.0, "claim_margin_s": 2.0, "concurrency": 16,
                                   "sandboxes": ["process"], "extra_binds": [rec.dir], **(executor or {})})
    ticker_settings = TickerSettings(**{"resync_s": 30.0, "recover_s": 1.0, "lease_ttl_s": 6.0, "lease_renew_s": 1.0,
                                        **ticker})
    return fast_settings(tmp_path, executor=executor, ticker=ticker_settings)


@pytest.fixture
async def api(engine) -> AsyncIterator:
    """`await api(node)`: an HTTP client of the node's API with an editor-and-more token."""
    async with node_clients(engine, "admin", "ticker fault test") as make:
        yield make


async def ledger_rows(engine, job_id) -> list:
    async with engine.connect() as conn:
        return list(await conn.execute(select(job_runs).where(job_runs.c.job_id == job_id).order_by(job_runs.c.slot)))


async def range_rows(engine, job_id) -> list:
    async with engine.connect() as conn:
        return list(await conn.execute(select(missed_ranges).where(missed_ranges.c.job_id == job_id)
                                       .order_by(missed_ranges.c.first_slot)))


def slots_between(expr: str, after: datetime, until: datetime) -> list[datetime]:
    """The schedule's slots in (after, until]."""
    out = []
    for slot in Schedule.parse(expr).slots(after):
        if slot > until:
            break
        out.append(slot)
    return out


def seconds(n: float) -> timedelta:
    return timedelta(seconds=n)
