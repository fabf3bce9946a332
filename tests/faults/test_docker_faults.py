"""A paused executor's docker-backend agents, counted by the Docker engine's own events: its
watchdog kills a container whose deadline the executor no longer extends, before the claim
can lapse, and writes down the end of one that exited by itself meanwhile, so the attempt
is never run beside itself nor run again."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

import pytest
from sqlalchemy import text

from kjob.store.slots import SlotLedger
from tests.faults.harness import FAST_ENV, LEASE_S, _ready, fault_cluster
from tests.support.images import ensure_test_images
from tests.support.pipeline import create_job, until

pytestmark = [pytest.mark.slow, pytest.mark.docker]

#: Past the lease, the takeover grace and a redelivery to the other node.
PAUSE_S = LEASE_S * 1.5 + float(FAST_ENV["KJOB_ACK_WAIT_S"]) + 3


def _events(since: float, slug: str) -> list[dict]:
    """The engine's start and die events of the job's containers since `since`."""
    out = subprocess.run(
        ["docker", "events", "--since", f"{since:.3f}", "--until", f"{time.time():.3f}", "--format", "{{json .}}",
         "--filter", "type=container", "--filter", f"label=kjob.job={slug}",
         "--filter", "event=start", "--filter", "event=die"],
        check=True, capture_output=True, text=True, timeout=30).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _running(slug: str) -> list[dict]:
    out = subprocess.run(["docker", "ps", "--filter", f"label=kjob.job={slug}", "--format", "{{json .Labels}}"],
                         check=True, capture_output=True, text=True, timeout=30).stdout
    return [dict(kv.split("=", 1) for kv in json.loads(line).split(",") if "=" in kv) for line in out.splitlines()]


@pytest.mark.parametrize("agent_s", [10, 2], ids=["runs-through-the-pause", "ends-during-the-pause"])
async def test_a_paused_executors_container(tmp_path, fresh_nats, agent_s):
    image = ensure_test_images()
    since = time.time()
    async with fault_cluster(tmp_path, fresh_nats, env={"KJOB_EXECUTOR__SANDBOXES": '["process", "docker"]'}) as c:
        slug = f"box{agent_s}"
        job = await create_job(c.engine, slug=slug, prompt=f"sleep {agent_s}", schedule="@every 1h",
                               sandbox={"backend": "docker", "image": image, "pull": "never"})
        # A run now (the ticker's recovery publishes it within seconds); no slot is due meanwhile.
        await SlotLedger(c.engine).create_manual(job)
        labels = (await until(lambda: _ready(_running(slug)), 60, "the job's container to run"))[0]
        node, run_id = labels["kjob.node"], labels["kjob.run"]
        if agent_s == 2:
            await asyncio.sleep(0.8)  # it ends while its executor is paused
        c.nodes[node].signal(signal.SIGSTOP)
        await asyncio.sleep(PAUSE_S)
        c.nodes[node].signal(signal.SIGCONT)

        async def final():
            async with c.engine.connect() as conn:
                row = (await conn.execute(text("SELECT status, attempt FROM job_runs WHERE id = :r"),
                                          {"r": run_id})).one()
            return row if row.status in ("succeeded", "failed", "error") else None
        ended = await until(final, 90, "the run to end")
        async with c.engine.connect() as conn:
            attempts = (await conn.execute(text(
                "SELECT attempt, executor, status, agent_exit_code FROM run_attempts WHERE run_id = :r ORDER BY attempt"),
                {"r": run_id})).all()
        events = _events(since, slug)
    spans: dict[str, list[float]] = {}
    for e in events:
        if e["Actor"]["Attributes"].get("kjob.run") == run_id:
            spans.setdefault(e["id"], []).append(e["timeNano"] / 1e9)
    starts = sorted((min(t), max(t)) for t in spans.values())
    assert ended.status == "succeeded", (ended, attempts, c.tails())
    if agent_s == 2:
        # One container ever: its end, which the paused executor could not record, stands.
        assert len(starts) == 1, (starts, attempts)
        assert ended.attempt == 1 and attempts[0].agent_exit_code == 0, attempts
    else:
        # Killed by the watchdog (about a lease after its last renewal, before the claim could
        # lapse), then run again on the other node: never side by side.
        assert len(starts) == 2, (starts, attempts)
        (_, first_died), (second_started, _) = starts
        assert first_died < second_started, f"containers overlap: {starts}"
        assert [a.status for a in attempts] == ["lost", "succeeded"], attempts
