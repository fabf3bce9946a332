"""Jitter and `pause_after_failures` on a real pipeline."""

from __future__ import annotations

from collections import Counter
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone

from kjob.config import TickerSettings
from kjob.model.policies import jitter_for
from kjob.model.run import RunStatus, run_id_for
from kjob.store.audit import list_audit
from kjob.store.jobs import JobStore
from kjob.store.runs import RunReads
from kjob.store.slots import SlotLedger
from tests.support.pipeline import ACTOR, create_job, fast_settings, running_node, runs_of, until
from tests.security.test_nats_permissions import secured_nats, violations  # noqa: F401
from tests.support.relay import RecordingRelay


async def test_jitter_fires_each_slot_after_its_own_delay_and_keeps_the_nominal_slot(tmp_path, fresh_nats,
                                                                                       database_url, engine):
    job = await create_job(engine, slug="spread", prompt="true", schedule="@every 2s", jitter="1500ms")
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url):
        started = datetime.now(timezone.utc)

        async def four_fired():
            runs = [r for r in await runs_of(engine, job) if r.slot > started and r.started_at]
            return len(runs) >= 4 and runs
        runs = await until(four_fired, 20, "four slots fired after the node started")
    delays = []
    for run in runs:
        # the ledger keeps the nominal slot, and so the run key
        assert run.slot.microsecond == 0 and run.slot.second % 2 == 0
        assert run.id == run_id_for(job.id, run.slot)
        # the run started after its delay: 1.5s, capped at half the 2s gap (it may be written and
        # published earlier, by the ticker's look-ahead, and held by the executor until then)
        delay = jitter_for(job.id, run.slot, timedelta(milliseconds=1500), run.slot + timedelta(seconds=2))
        assert delay < timedelta(seconds=1)
        assert run.slot + delay - timedelta(milliseconds=5) <= run.started_at < run.slot + delay + timedelta(seconds=1)
        delays.append(delay)
    assert len(set(delays)) > 1


async def test_a_job_failing_n_times_in_a_row_is_paused_and_its_channel_alerted_once(tmp_path, fresh_nats,
                                                                                      database_url, engine):
    with RecordingRelay() as relay:
        job = await create_job(engine, slug="broken", prompt="echo no such table >&2; exit 2", schedule="@every 1s",
                               pause_after_failures=3, output={"channel": "ops"})
        async with running_node(fast_settings(tmp_path, relay_url=relay.url), fresh_nats.url, database_url):
            async def paused():
                current = await JobStore(engine).get_by_id(job.id)
                return not current.enabled and current
            stopped = await until(paused, 20, "the job to be paused")
            await relay.wait_for(lambda r: any(q.json["message"]["title"].endswith("paused after 3 failures")
                                               for q in r.accepted), timeout=10)
            # no slot is fired once the ticker has dropped the job (allow the one in flight)
            count = len(await runs_of(engine, job))
            late = datetime.now(timezone.utc) + timedelta(seconds=3)
            await until(lambda: _after(late), 5, "three more seconds")
            assert len(await runs_of(engine, job)) <= count + 1
    runs = await runs_of(engine, job)
    failed = [r for r in runs if r.status is RunStatus.failed]
    assert len(failed) >= 3 and not [r for r in runs if r.status is RunStatus.succeeded]
    assert stopped.paused_note.startswith("paused after 3 consecutive failed runs (the last: run ")
    assert stopped.paused_at is not None
    alerts = [q for q in relay.accepted if q.json["message"]["title"] == "[broken] paused after 3 failures"]
    assert len(alerts) == 1  # once, though runs kept failing while it was being paused
    [alert] = alerts
    last = alert.idempotency_key.removesuffix(".paused")
    assert alert.idempotency_key == f"{last}.paused" and last in {r.id for r in failed}
    assert alert.json["channel"] == "ops" and alert.json["message"]["status"] == "failed"
    assert stopped.paused_note in alert.json["message"]["body"] and f"/ui/runs/{last}" in alert.json["message"]["body"]
    # every failed run's own result was delivered too, once each
    results = Counter(q.idempotency_key for q in relay.accepted if q.json["message"]["title"] == "[broken] failed")
    assert set(results) == {r.id for r in failed} and set(results.values()) == {1}
    [entry] = [e for e in await list_audit(engine, job.tenant, target="job/broken") if e.action == "job.disable"]
    assert entry.actor == "kjob:pause_after_failures" and entry.change["note"] == stopped.paused_note


async def test_only_failures_in_a_row_count_a_success_breaks_the_streak(tmp_path, fresh_nats, database_url, engine):
    job = await create_job(engine, slug="flaky", prompt="exit 1", schedule="0 0 1 1 *", pause_after_failures=2)
    store, slots, reads = JobStore(engine), SlotLedger(engine), RunReads(engine)

    async def run_with(node, prompt: str) -> RunStatus:
        current = await store.get(job.tenant, job.slug)
        await store.update(ACTOR, job.slug, current.spec().model_copy(update={"prompt": prompt}))
        run = await slots.create_manual(job)
        await node.publish_due(run)

        async def ended():
            now = await reads.get(job.tenant, run.id)
            return now.status.final and now
        return (await until(ended, 15, f"the run of {prompt!r} to end")).status

    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url) as node:
        assert [await run_with(node, p) for p in ("exit 1", "true", "exit 1")] == [
            RunStatus.failed, RunStatus.succeeded, RunStatus.failed]
        assert (await store.get_by_id(job.id)).enabled  # fail, success, fail: no two in a row
        assert await run_with(node, "exit 3") is RunStatus.failed
        paused = await until(lambda: _paused(store, job), 10, "the job to be paused after the second failure in a row")
    assert paused.paused_note.startswith("paused after 2 consecutive failed runs")


async def _paused(store, job):
    current = await store.get_by_id(job.id)
    return not current.enabled and current


async def _after(moment: datetime) -> bool:
    return datetime.now(timezone.utc) >= moment


async def test_the_pause_stays_inside_each_roles_nats_permissions(tmp_path, secured_nats, database_url, engine):
    # One node per role, each as its own NATS user (deploy/nats/nats-server.conf): the executor
    # that pauses the job announces it, and the ticker stops firing it at once.
    job = await create_job(engine, slug="broken", prompt="exit 1", schedule="@every 1s", pause_after_failures=2,
                           output={"channel": "ops"})
    with RecordingRelay() as relay:
        async with AsyncExitStack() as stack:
            for role in ("ticker", "executor", "dispatcher"):
                settings = fast_settings(tmp_path / role, relay_url=relay.url, node_name=f"node-{role}",
                                         ticker=TickerSettings(resync_s=600.0, recover_s=1.0))
                await stack.enter_async_context(
                    running_node(settings, secured_nats.urls[role], database_url, roles=frozenset({role})))
            stopped = await until(lambda: _paused(JobStore(engine), job), 20, "the job to be paused")
            await relay.wait_for(lambda r: any(q.idempotency_key and q.idempotency_key.endswith(".paused")
                                               for q in r.accepted), timeout=10)
            count = len(await runs_of(engine, job))
            late = datetime.now(timezone.utc) + timedelta(seconds=3)
            await until(lambda: _after(late), 5, "three more seconds")
            # without the job_changed event, the ticker (resync every 10 minutes) would fire on
            assert len(await runs_of(engine, job)) <= count + 1
    assert stopped.paused_note.startswith("paused after 2 consecutive failed runs")
    assert violations(secured_nats) == []
