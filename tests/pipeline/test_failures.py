"""The pipeline under failure: a killed executor, a Relay that is down, a restart of `kjob up`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from kjob.model.run import DeliveryStatus, RunStatus
from kjob.store.runs import RunReads
from kjob.store.slots import SlotLedger
from tests.support.pipeline import create_job, fast_settings, running_node, runs_of, until
from tests.support.relay import RecordingRelay

KJOB = str(Path(sys.executable).with_name("kjob"))


def executor_process(tmp_path: Path, nats_url: str, database_url: str, name: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "KJOB_HOME": str(tmp_path / name),
        "KJOB_NATS_URL": nats_url,
        "KJOB_DATABASE_URL": database_url,
        "KJOB_NODE_NAME": name,
        "KJOB_ACK_WAIT_S": "4",
        "KJOB_EXECUTOR__HEARTBEAT_S": "0.5",
        "KJOB_EXECUTOR__CLAIM_LEASE_S": "2",
        "KJOB_EXECUTOR__SANDBOXES": '["process"]',
    }
    return subprocess.Popen([KJOB, "server", "--roles", "executor"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{name}.log", "wb"))


async def test_sigkilled_executor_mid_run_is_finished_once_by_another(tmp_path, fresh_nats, database_url, engine):
    with RecordingRelay() as relay:
        # This node has no executor: the only one is the child process we kill.
        settings = fast_settings(tmp_path, relay_url=relay.url)
        job = await create_job(engine, slug="long", prompt="sleep 2; echo finished", schedule="@every 1h",
                               output={"channel": "ops"})
        ledger = RunReads(engine)
        async with running_node(settings, fresh_nats.url, database_url,
                                roles=frozenset({"ticker", "dispatcher", "api"})) as node:
            victim = executor_process(tmp_path, fresh_nats.url, database_url, "exec-a")
            try:
                run = await SlotLedger(engine).create_manual(job)
                await node.publish_due(run)

                async def running_on_a():
                    current = await ledger.get(job.tenant, run.id)
                    attempts = await ledger.attempts(run.id)
                    return current.status is RunStatus.running and attempts and attempts[0].executor == "exec-a"
                await until(running_on_a, 20, "exec-a to start the run")
                victim.send_signal(signal.SIGKILL)
                victim.wait(5)
            finally:
                victim.kill()
            rescuer = executor_process(tmp_path, fresh_nats.url, database_url, "exec-b")
            try:
                async def final():
                    current = await ledger.get(job.tenant, run.id)
                    return current.status.final and current.delivery_status is DeliveryStatus.delivered and current
                done = await until(final, 40, "the run to be finished by exec-b and delivered")
            finally:
                rescuer.send_signal(signal.SIGTERM)
                rescuer.wait(15)
        attempts = await ledger.attempts(run.id)
    assert done.status is RunStatus.succeeded
    assert [(a.executor, a.status) for a in attempts] == [("exec-a", RunStatus.lost), ("exec-b", RunStatus.succeeded)]
    assert len(await runs_of(engine, job)) == 1
    assert [q.idempotency_key for q in relay.accepted] == [run.id]
    assert rescuer.returncode == 0, (tmp_path / "exec-b.log").read_text()


async def test_relay_down_for_30s_gets_every_result_once_when_it_recovers(tmp_path, fresh_nats, database_url, engine):
    with RecordingRelay() as relay:
        relay.fail(503, seconds=30)
        settings = fast_settings(tmp_path, relay_url=relay.url)
        job = await create_job(engine, slug="chatty", prompt="echo hi", schedule="@every 2s", output={"channel": "ops"})
        async with running_node(settings, fresh_nats.url, database_url):
            await until(lambda: _count_final(engine, job, 3), 15, "3 finished runs while Relay is down")
            rejected_meanwhile = len(relay.requests) - len(relay.accepted)

            async def all_delivered():
                runs = [r for r in await runs_of(engine, job) if r.status.final]
                return len(runs) >= 3 and all(r.delivery_status is DeliveryStatus.delivered for r in runs) and runs
            await until(all_delivered, 60, "every finished run delivered after Relay recovers")
            # stop producing: disable by deleting nothing; the node stops right after
        runs = [r for r in await runs_of(engine, job) if r.status.final]
    assert rejected_meanwhile >= 3  # the dispatcher really tried while Relay answered 503
    accepted = Counter(q.idempotency_key for q in relay.accepted)
    delivered = [r for r in runs if r.delivery_status is DeliveryStatus.delivered]
    assert delivered and all(accepted[r.id] == 1 for r in delivered)
    assert all(count == 1 for count in accepted.values())
    assert all(r.status is RunStatus.succeeded for r in runs)  # retrying delivery never re-ran an agent
    assert all(r.attempt == 1 for r in runs)


async def _count_final(engine, job, n):
    return len([r for r in await runs_of(engine, job) if r.status.final]) >= n
