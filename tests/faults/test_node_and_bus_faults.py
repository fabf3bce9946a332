"""Faults of the nodes and of NATS under a live cluster, counted by the agents themselves: an
executor SIGKILLed mid-run, a node whose wall clock runs 30 s ahead, a NATS restart, and one
NATS node lost from an R3 cluster."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from sqlalchemy import text

from tests.faults.harness import (
    FAST_ENV, LEASE_S, _ready, exercise, executor_sigkill, executor_sigstop, fault_cluster, nats_node_lost, nats_restart,
)
from tests.support.pipeline import until

pytestmark = pytest.mark.slow


async def test_executor_sigkilled_mid_run(tmp_path, fresh_nats):
    """The killed node's agents run on within their claims (its watchdog watches them), and
    their ends stand: each of their runs is concluded elsewhere without running again."""
    async with fault_cluster(tmp_path, fresh_nats) as c:
        await c.add_jobs(3, 1.5, slug="work", schedule="@every 4s")
        verdict = await exercise(c, executor_sigkill, before=3, after=6)
    [(node, killed, _)] = c.pauses
    orphans = [e for e in c.recorder.executions() if e.started < killed and e.finished and e.ended > killed
               and e.node in (node, None)]  # an orphan's executor, its ancestor, is gone
    assert orphans, "no agent of the killed node ran on to its end"
    verdict.check()  # no excuses: one execution per slot, the orphans' among them
    assert c.exit_codes["node-a"] == 0 and c.exit_codes["node-b"] == 0, c.tails()


async def test_executor_sigstopped_mid_run(tmp_path, fresh_nats):
    """A paused executor cannot stop its agent; its watchdog kills it before the claim lapses,
    so the attempt the other node runs never overlaps it (the agent works for 20 s, longer
    than the pause)."""
    async with fault_cluster(tmp_path, fresh_nats) as c:
        await c.add_jobs(1, 20, slug="slow", schedule="@every 5s")
        await c.add_jobs(2, 0.3)
        await exercise(c, executor_sigstop, before=2, after=6)
        [(node, _, _)] = c.pauses
        verdict = await c.verdict(c.ended_while_paused)
    assert any(e.died is not None and e.node == node and e.job.startswith("slow")
               for e in c.recorder.executions()), "no slow agent of the paused node was killed"
    verdict.check()


async def test_one_node_clock_30s_ahead(tmp_path, fresh_nats):
    """Claims and deadlines use the database's clock: a node whose clock runs ahead must not
    see the other's live claims as expired and steal them."""
    async def nothing_but_time(c) -> None:
        # both nodes at work, node-a's slow agents among them, for a while
        await until(lambda: _ready(len({e.job for e in c.recorder.executions() if e.node == "node-a"}) >= 3),
                    60, "node-a to run agents of several jobs")
        await c.executions_done(12)

    async with fault_cluster(tmp_path, fresh_nats, skewed={"node-b": 30}) as c:
        verdict = await exercise(c, nothing_but_time, slow=True)
    verdict.check()
    assert {e.node for e in c.recorder.completed()} == {"node-a", "node-b"}
    # Both started together: node-b's first log line is stamped about 30 s after node-a's.
    assert c.clock_ahead("node-b") - c.clock_ahead("node-a") > 20, "node-b's clock was not ahead"
    assert all(code == 0 for code in c.exit_codes.values()), c.tails()


async def test_nats_restart(tmp_path, fresh_nats):
    async with fault_cluster(tmp_path, fresh_nats) as c:
        verdict = await exercise(c, nats_restart)
    verdict.check()
    assert all(code == 0 for code in c.exit_codes.values()), c.tails()


async def test_nats_node_lost_in_r3(tmp_path, nats_cluster):
    async with fault_cluster(tmp_path, nats_cluster(3)) as c:
        verdict = await exercise(c, nats_node_lost)
    verdict.check()
    assert all(code == 0 for code in c.exit_codes.values()), c.tails()


@pytest.mark.parametrize("fault", ["sigstop", "sigkill", "sigkill-in-a-stall", "sigkill-sessions-dropped"])
async def test_an_agent_that_ends_while_its_executor_cannot_record_it_is_not_run_again(tmp_path, fresh_nats, fault):
    """The executor is paused (or killed) at the instant its agent reports its end, before the
    agent exits: only its watchdog sees the end (bwrap's status pipe) and writes it down, and
    the node that takes the claim over concludes the attempt without running the agent again.
    Every slot must have exactly one execution that ran to its end: no excuses.

    `sigkill-in-a-stall`: PostgreSQL is paused at the same instant, past the claim's lease and
    grace, so nobody can write and the claim lapses meanwhile. When it is back, the watchdog's
    write and the other node's takeover are both waiting on it: the takeover must give way.
    `sigkill-sessions-dropped`: every kjob session is terminated first (pg_terminate_backend),
    the watchdog's own among them: it must write the end on a new one."""
    struck: list[tuple[str, float]] = []

    def strike(execution) -> None:
        if struck or not (execution.job or "").startswith("end"):
            return
        struck.append((execution.node, time.monotonic()))
        if fault == "sigkill-in-a-stall":
            c.pg_pause()
        elif fault == "sigkill-sessions-dropped":
            c.pg.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                      "WHERE datname = 'faults' AND pid <> pg_backend_pid()")
        c.nodes[execution.node].signal(signal.SIGSTOP if fault == "sigstop" else signal.SIGKILL)

    async with fault_cluster(tmp_path, fresh_nats) as c:
        await c.add_jobs(2, 1.0, slug="end", schedule="@every 3s")
        await c.executions_done(2)
        c.recorder.on_end = strike
        await until(lambda: _ready(struck), 30, "an agent's end to strike at")
        c.recorder.on_end = None
        node, at = struck[0]
        if fault == "sigstop":
            # Past the lease, the takeover grace and a redelivery to the other node.
            await asyncio.sleep(LEASE_S * 1.5 + float(FAST_ENV["KJOB_ACK_WAIT_S"]) + 3)
            c.nodes[node].signal(signal.SIGCONT)
        elif fault == "sigkill-in-a-stall":
            # Past the lease, the takeover grace and a redelivery: the other node's claim is
            # sent during the stall, and waits on it like the watchdog's write.
            await asyncio.sleep(LEASE_S * 1.5 + float(FAST_ENV["KJOB_ACK_WAIT_S"]) + 3)
            c.pg_resume()
            await c.restart(node)
        else:
            await asyncio.to_thread(c.nodes[node].proc.wait, 10)
            await c.restart(node)
        await c.executions_done(3)
        await c.end_window()
        verdict = await c.verdict()  # no execution excused
        async with c.engine.connect() as conn:
            written = (await conn.execute(text(
                "SELECT r.status, r.attempt, a.attempt AS a_attempt, a.executor, r.reason FROM run_attempts a "
                "JOIN job_runs r ON r.id = a.run_id WHERE a.agent_exit_code = 0"))).all()
    verdict.check()
    assert written, f"no agent end was written by a watchdog (struck {node} at {at:.2f}); logs: {c.tails()}"
    assert all(w.status == "succeeded" and w.executor == node and w.attempt == w.a_attempt for w in written), written
