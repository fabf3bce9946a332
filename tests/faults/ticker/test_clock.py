"""A leading ticker whose host clock runs 30 s ahead (libfaketime on its node) fires each slot
at its instant by the database's clock, as claims are judged: never 30 s early. Counted by the
agents (tests/support/recorder.py) and by the ledger's start times, which the database stamps."""

from __future__ import annotations

from sqlalchemy import text

from tests.faults.harness import fault_cluster


async def test_a_leader_whose_clock_runs_ahead_fires_at_the_databases_instant(tmp_path, fresh_nats):
    async with fault_cluster(tmp_path, fresh_nats, skewed={"node-a": 30}, lead_skewed=True) as c:
        assert await c.leader(timeout=60) == "node-a"
        await c.add_jobs(2, 0.2)
        await c.executions_done(6)
        async with c.engine.connect() as conn:
            early = (await conn.execute(text(
                "SELECT slug, slot, started_at FROM job_runs WHERE started_at IS NOT NULL "
                "AND started_at < slot - interval '1 second'"))).all()
            started = (await conn.execute(text("SELECT count(*) FROM job_runs WHERE started_at IS NOT NULL"))).scalar()
        await c.end_window()
        verdict = await c.verdict()
    assert started >= 6
    assert not early, f"{len(early)} runs started before their slot: {early[:5]}"
    verdict.check()
    # The leader saw its clock run ahead, and said so.
    assert "clock is 30" in c.nodes["node-a"].logs(10**7) and "ahead of the database's" in c.nodes["node-a"].logs(10**7)
