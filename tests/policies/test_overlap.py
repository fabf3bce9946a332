"""The overlap policy on a real pipeline (ticker, executor and ledger on real NATS and
PostgreSQL): what a run does when it comes while another run of its job still runs."""

from __future__ import annotations

from datetime import timedelta

from kjob.model.policies import DEFER_MAX_S
from sqlalchemy import update

from kjob.model.run import DeliveryStatus, MissReason, RunStatus, Trigger, run_id_for
from kjob.store.claims import ClaimLedger
from kjob.store.overlap import DISABLED_REASON, Skipped
from kjob.store.runs import RunReads
from kjob.store.slots import SlotLedger, SlotRow
from kjob.store.tables import jobs
from tests.policies.conftest import never_overlap
from tests.support.ledger import record_slots
from tests.support.pipeline import attempts_of, create_job, fast_settings, running_node, runs_of, until


async def test_skip_records_each_slot_that_comes_while_the_previous_run_runs(tmp_path, fresh_nats, database_url, engine):
    job = await create_job(engine, slug="slow", prompt="sleep 2.5", schedule="@every 1s")
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url):
        async def a_run_and_skips():
            runs = await runs_of(engine, job)
            done = [r for r in runs if r.status is RunStatus.succeeded]
            return done and len([r for r in runs if r.status is RunStatus.skipped]) >= 3 and runs
        await until(a_run_and_skips, 25, "a finished run and three skipped slots")
    runs = await runs_of(engine, job)
    ran = {r.id: r for r in runs if r.attempt > 0}
    never_overlap(list(ran.values()))
    skipped = [r for r in runs if r.status is RunStatus.skipped]
    for r in skipped:
        holder = ran[r.reason.removeprefix("previous run ").removesuffix(" still running")]
        assert r.reason == f"previous run {holder.id} still running" and r.reason_code is MissReason.overlap
        # the run it names really was running when this slot was skipped
        assert holder.started_at <= r.finished_at and (holder.finished_at is None or r.finished_at <= holder.finished_at)
        assert r.attempt == 0 and r.delivery_status is DeliveryStatus.none
        assert await attempts_of(engine, r.id) == []


async def test_a_slot_of_a_job_disabled_before_it_starts_is_skipped_as_job_gone(engine):
    job = await create_job(engine, slug="turned-off", prompt="true", schedule="0 0 1 1 *")
    slot = job.created_at.replace(microsecond=0)
    await record_slots(engine, [SlotRow(run_id=run_id_for(job.id, slot), job_id=job.id, tenant=job.tenant,
                                        slug=job.slug, slot=slot)])
    async with engine.begin() as conn:
        await conn.execute(update(jobs).where(jobs.c.id == job.id).values(enabled=False))
    claimed = await ClaimLedger(engine).claim(run_id_for(job.id, slot), "node-1", timedelta(seconds=10))
    assert isinstance(claimed, Skipped)
    stored = await RunReads(engine).get(job.tenant, claimed.run.id)
    assert (stored.status, stored.reason, stored.reason_code) == (RunStatus.skipped, DISABLED_REASON, MissReason.job_gone)


async def test_skip_lets_one_of_several_slots_claimed_at_once_run(tmp_path, fresh_nats, database_url, engine):
    # Five slots published together reach the executor together (concurrency 8): their claims
    # race, and the job lock lets exactly one of them start.
    # (Scheduled slots: a backfill's runs under `skip` wait their turn instead, test_backfill.py.)
    job = await create_job(engine, slug="herd", prompt="sleep 3", schedule="0 0 1 1 *")
    ledger = RunReads(engine)
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url) as node:
        slots = [job.created_at.replace(microsecond=0) - timedelta(minutes=m) for m in range(5, 0, -1)]
        rows = [SlotRow(run_id=run_id_for(job.id, s), job_id=job.id, tenant=job.tenant, slug=job.slug, slot=s)
                for s in slots]
        await record_slots(engine, rows)
        for row in rows:
            await node.publish_due(await ledger.get(job.tenant, row.run_id))

        async def settled():
            current = await runs_of(engine, job)
            return all(r.status.final for r in current) and current
        final = await until(settled, 20, "every slot to end")
    assert sorted(r.status.value for r in final) == ["skipped"] * 4 + ["succeeded"]


async def test_queue_runs_every_slot_one_at_a_time_in_slot_order(tmp_path, fresh_nats, database_url, engine):
    job = await create_job(engine, slug="queued", prompt="sleep 1.2", schedule="@every 1s", overlap="queue")
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url):
        async def three_done():
            runs = await runs_of(engine, job)
            return len([r for r in runs if r.status is RunStatus.succeeded]) >= 3 and runs
        await until(three_done, 25, "three queued runs to finish")
    runs = await runs_of(engine, job)
    assert not [r for r in runs if r.status is RunStatus.skipped]
    started = [r for r in runs if r.started_at is not None]
    never_overlap(started)
    assert [r.slot for r in started] == sorted(r.slot for r in started)  # slot order
    # a waiting run retries its claim with a capped backoff: it starts soon after its turn comes
    done = [r for r in started if r.finished_at is not None]
    for before, after in zip(done, done[1:]):
        assert after.started_at - before.finished_at < timedelta(seconds=DEFER_MAX_S + 1)


async def test_a_backfill_can_allow_overlap_for_its_runs(tmp_path, fresh_nats, database_url, engine):
    job = await create_job(engine, slug="parallel", prompt="sleep 1.5", schedule="0 0 1 1 *")  # overlap: skip
    ledger = SlotLedger(engine)
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url) as node:
        slots = [job.created_at.replace(microsecond=0) - timedelta(hours=h) for h in (3, 2, 1)]
        runs, _ = await ledger.record_backfill(job, slots, overlap="allow")
        for run in runs:
            await node.publish_due(run)

        async def all_done():
            current = await runs_of(engine, job)
            return all(r.status is RunStatus.succeeded for r in current) and current
        done = await until(all_done, 20, "the three backfilled runs to succeed")
    assert {r.trigger for r in done} == {Trigger.backfill} and {r.overlap for r in done} == {"allow"}
    assert max(r.started_at for r in done) < min(r.finished_at for r in done)  # all three ran at once


async def test_replace_cancels_the_running_run_then_starts_the_new_one(tmp_path, fresh_nats, database_url, engine):
    job = await create_job(engine, slug="latest-wins", prompt="sleep 30", schedule="@every 2s", overlap="replace",
                           timeout="1m")
    ledger = RunReads(engine)
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url):
        async def one_replaced_and_the_next_running():
            runs = await runs_of(engine, job)
            for old, new in zip(runs, runs[1:]):
                if old.status is RunStatus.cancelled and new.status is RunStatus.running:
                    return old, new
            return None
        old, new = await until(one_replaced_and_the_next_running, 20, "a run replaced by the next, which runs")
        [attempt] = await attempts_of(engine, old.id)
        new_now = await ledger.get(job.tenant, new.id)
    # a replaced run did start: it is no skipped slot, and has no skip code
    assert old.reason == f"replaced by run {new.id}" and old.reason_code is None
    assert old.delivery_status is DeliveryStatus.none
    # its one attempt ended as cancelled (no retry), and stopped before the new run started
    assert attempt.status is RunStatus.cancelled and attempt.reason == f"replaced by run {new.id}"
    assert attempt.finished_at is not None and attempt.finished_at <= new_now.started_at
