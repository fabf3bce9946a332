"""End to end: ticker -> JetStream -> executor (process sandbox) -> dispatcher -> recording Relay,
on a real nats-server and a real PostgreSQL."""

from __future__ import annotations

from collections import Counter

from kjob.model.run import DeliveryStatus, RunStatus, Trigger
from tests.support.pipeline import create_job, fast_settings, running_node, runs_of, until
from tests.support.relay import RecordingRelay

FINAL = {RunStatus.succeeded, RunStatus.failed, RunStatus.timed_out, RunStatus.error}


async def test_every_second_job_runs_each_slot_once_and_reaches_relay_once(tmp_path, fresh_nats, database_url, engine):
    with RecordingRelay() as relay:
        settings = fast_settings(tmp_path, relay_url=relay.url)
        job = await create_job(engine, slug="tick", prompt="echo tick-$KJOB_RUN_ID", output={"channel": "kode-chat:ops"})
        async with running_node(settings, fresh_nats.url, database_url):
            async def five_delivered():
                runs = [r for r in await runs_of(engine, job) if r.delivery_status is DeliveryStatus.delivered]
                return len(runs) >= 5 and runs
            await until(five_delivered, 30, "5 delivered runs")
        runs = await runs_of(engine, job)
        await relay.wait_for(lambda r: len({q.idempotency_key for q in r.accepted}) >= 5, timeout=5)

    # no hole: one run a second (the ledger's unique index already forbids two of a slot), run
    # by the schedule; the slots that fell due while no ticker led (before the node's start, or
    # while leadership changed hands on a loaded machine) run as catch-up, by the rule
    # (kjob.model.catchup)
    delivered = [r for r in runs if r.delivery_status is DeliveryStatus.delivered]
    assert all(r.status is RunStatus.succeeded and r.trigger in (Trigger.schedule, Trigger.catchup) for r in delivered)
    assert any(r.trigger is Trigger.schedule for r in delivered)
    slots = [r.slot for r in runs]
    assert all((b - a).total_seconds() == 1 for a, b in zip(slots, slots[1:]))
    # each delivered run reached the Relay exactly once, with the RFC payload
    keys = Counter(q.idempotency_key for q in relay.accepted)
    for run in delivered:
        assert keys[run.id] == 1
    request = next(q for q in relay.accepted if q.idempotency_key == delivered[0].id)
    assert request.path == "/v1/dispatch"
    body = request.json
    assert body["channel"] == "kode-chat:ops"
    assert body["message"]["title"] == "[tick] completed"
    assert body["message"]["status"] == "success"
    assert body["message"]["body"].startswith(f"tick-{delivered[0].id}")
    assert f"/ui/runs/{delivered[0].id}" in body["message"]["body"]


async def test_failing_and_sleeping_prompts_report_failed_and_timeout(tmp_path, fresh_nats, database_url, engine):
    with RecordingRelay() as relay:
        settings = fast_settings(tmp_path, relay_url=relay.url)
        failing = await create_job(engine, slug="fails", prompt="echo broken >&2; exit 3",
                                   schedule="@every 1h", output={"channel": "ops"})
        sleeping = await create_job(engine, slug="sleeps", prompt="sleep 30", timeout="1s",
                                    schedule="@every 1h", output={"channel": "ops"})
        async with running_node(settings, fresh_nats.url, database_url) as node:
            from kjob.store.slots import SlotLedger

            for job in (failing, sleeping):
                run = await SlotLedger(engine).create_manual(job)
                await node.publish_due(run)

            async def both_final():
                runs = [r for j in (failing, sleeping) for r in await runs_of(engine, j)]
                return all(r.status in FINAL and r.delivery_status is DeliveryStatus.delivered for r in runs) and runs
            await until(both_final, 20, "both runs final and delivered")
        [failed] = await runs_of(engine, failing)
        [timed] = await runs_of(engine, sleeping)
        assert failed.status is RunStatus.failed and failed.exit_code == 3
        assert "broken" in (failed.output_excerpt or "")
        assert timed.status is RunStatus.timed_out
        statuses = {q.json["message"]["title"]: q.json["message"]["status"] for q in relay.accepted}
        assert statuses == {"[fails] failed": "failed", "[sleeps] timeout": "timeout"}


async def test_always_failing_job_with_two_retries_makes_exactly_three_attempts(tmp_path, fresh_nats, database_url, engine):
    settings = fast_settings(tmp_path)
    job = await create_job(engine, slug="flaky", prompt="exit 1", schedule="@every 1h",
                           retries={"max": 2, "backoff": "exponential", "initial_delay": "200ms", "max_delay": "1s"})
    async with running_node(settings, fresh_nats.url, database_url) as node:
        from kjob.store.runs import RunReads
        from kjob.store.slots import SlotLedger

        ledger = RunReads(engine)
        run = await SlotLedger(engine).create_manual(job)
        await node.publish_due(run)

        async def final():
            [r] = await runs_of(engine, job)
            return r.status.final and r
        done = await until(final, 20, "the run to end")
    attempts = await ledger.attempts(run.id)
    assert done.status is RunStatus.failed and done.attempt == 3
    assert [a.status for a in attempts] == [RunStatus.failed] * 3
    # exponential backoff: the gaps between attempts grow
    starts = [a.started_at for a in attempts]
    assert (starts[1] - starts[0]).total_seconds() >= 0.2
    assert (starts[2] - starts[1]).total_seconds() >= 0.4
