"""Faults of the database under a live cluster, counted by the agents themselves (the
recorder): PostgreSQL paused past the claim lease, backends terminated as attempts end, a
PostgreSQL restart, one executor cut off from PostgreSQL by a partition."""

from __future__ import annotations

import pytest

from tests.faults.harness import exercise, fault_cluster, pg_partition, pg_pause, pg_restart, pg_terminate_at_end

pytestmark = pytest.mark.slow


async def test_postgres_paused_longer_than_the_claim_lease(tmp_path, fresh_nats):
    """Defect 1: a stalled database ran an agent twice, in parallel (the heartbeat hung, the
    claim expired, another executor took the run while the first agent still ran)."""
    async with fault_cluster(tmp_path, fresh_nats) as c:
        verdict = await exercise(c, pg_pause, slow=True)
    verdict.check()
    assert all(code == 0 for code in c.exit_codes.values()), c.tails()


async def test_backends_terminated_as_attempts_end(tmp_path, fresh_nats):
    """Defect 2: `finish` failed on a dropped connection, was not retried, and the attempt ran
    again (as `lost`) although the agent had run to its end."""
    async with fault_cluster(tmp_path, fresh_nats) as c:
        verdict = await exercise(c, pg_terminate_at_end)
    verdict.check()
    assert all(code == 0 for code in c.exit_codes.values()), c.tails()


async def test_postgres_restart(tmp_path, fresh_nats):
    async with fault_cluster(tmp_path, fresh_nats) as c:
        verdict = await exercise(c, pg_restart)
    verdict.check()
    assert all(code == 0 for code in c.exit_codes.values()), c.tails()


async def test_partition_between_one_executor_and_postgres(tmp_path, fresh_nats):
    """node-a's connections to PostgreSQL go silent (no reset, no error) for twice the lease:
    its agents must stop before their claims lapse, and node-b runs each slot once."""
    async with fault_cluster(tmp_path, fresh_nats, proxied="node-a") as c:
        verdict = await exercise(c, pg_partition)
    verdict.check()
    assert all(code == 0 for code in c.exit_codes.values()), c.tails()
