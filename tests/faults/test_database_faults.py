"""Faults of the database under a live cluster, counted by the agents themselves (the
recorder): a PostgreSQL paused past the claim lease, backends terminated as attempts end, a
PostgreSQL restart, and one executor cut off from PostgreSQL by a partition."""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.harness import LEASE_S, fault_cluster

pytestmark = pytest.mark.slow


async def test_postgres_paused_longer_than_the_claim_lease(tmp_path, fresh_nats):
    """Defect 1: a stalled database ran an agent twice, in parallel (the heartbeat hung, the
    claim expired, another executor took the run while the first agent still ran)."""
    async with fault_cluster(tmp_path, fresh_nats.url) as c:
        await c.add_jobs(3, 0.3)
        await c.add_jobs(1, 2.5, slug="slow")
        await c.executions_done(10)
        await c.running_now()
        c.pg_pause()
        await asyncio.sleep(LEASE_S * 2)  # the fault itself: past every claim's lease
        c.pg_resume()
        await c.executions_done(10)
        await c.end_window()
        verdict = await c.verdict()
    verdict.check()
    assert verdict.ran_once >= 20
    assert all(code == 0 for code in c.exit_codes.values()), c.tails()
