"""Published runs whose due message vanished from the stream (purged here; a stream lost and
re-created is the same to the ledger) are published again by the ticker's recovery loop, and
run once. Before the fix they stayed `scheduled` forever: recovery only looked at runs never
published."""

from __future__ import annotations

from kjob.bus import names
from kjob.bus.setup import connect
from kjob.model.run import RunStatus
from tests.faults.ticker.conftest import ledger_rows, node_settings
from tests.support.pipeline import create_job, running_node, until


async def test_runs_whose_message_was_purged_are_published_again_and_run_once(
        tmp_path, fresh_nats, database_url, engine, recorder):
    job = await create_job(engine, slug="purged", prompt=recorder.script(seconds=0.05), schedule="@every 1s",
                           overlap="allow")
    settings = node_settings(tmp_path, recorder, vanished_after_s=1.0)
    # A ticker alone: its due messages wait in the stream, nobody takes them.
    async with running_node(settings, fresh_nats.url, database_url, roles=frozenset({"ticker"})):
        async def published():
            rows = [r for r in await ledger_rows(engine, job.id) if r.published_at is not None]
            return len(rows) >= 3 and rows
        await until(published, 30, "three slots published")
        nc = await connect(fresh_nats.url, "purge-test")
        await nc.jetstream().purge_stream(names.RUNS_STREAM)
        await nc.close()
        # the runs whose message is gone (later slots have theirs)
        waiting = [r for r in await ledger_rows(engine, job.id) if r.published_at is not None]
        assert waiting
        # Now an executor comes; only what recovery publishes again can reach it.
        async with running_node(node_settings(tmp_path / "exec", recorder), fresh_nats.url, database_url,
                                roles=frozenset({"executor"})):
            async def ran():
                rows = {r.id: r for r in await ledger_rows(engine, job.id)}
                return all(rows[r.id].status == RunStatus.succeeded.value for r in waiting)
            await until(ran, 30, "every purged run to run")
    executions = recorder.by_run()
    assert all(len(executions.get(r.id, [])) == 1 for r in waiting)


async def test_a_finished_run_whose_result_message_was_lost_is_delivered(tmp_path, fresh_nats, database_url, engine):
    """An executor that recorded a run's end and then died, paused or lost NATS before its
    result reached the stream left the run `succeeded`, delivery `pending`, forever (the
    chaos test's NATS node loss showed it). Recovery publishes such results again."""
    from sqlalchemy import text

    from kjob.model.run import DeliveryStatus
    from kjob.store.claims import ClaimLedger, Claimed
    from kjob.store.deliveries import DeliveryLedger
    from kjob.store.slots import SlotLedger
    from tests.support.relay import RecordingRelay

    job = await create_job(engine, slug="lost-result", prompt="true", schedule="@every 1h",
                           output={"channel": "kode-chat:ops"})
    ledger = ClaimLedger(engine)
    run = await SlotLedger(engine).create_manual(job)
    assert isinstance(await ledger.claim(run.id, "gone-node", __import__("datetime").timedelta(seconds=30)), Claimed)
    ended = await ledger.finish(run.id, "gone-node", 1, status=RunStatus.succeeded, exit_code=0, reason=None,
                                output="done", output_bytes=4, dropped_bytes=0, retry_in_s=None)
    assert ended is not None and ended.delivery_status is DeliveryStatus.pending
    async with engine.begin() as conn:  # it ended a while ago; no result message was ever published
        await conn.execute(text("UPDATE job_runs SET finished_at = now() - interval '2 minutes' WHERE id = :id"),
                           {"id": run.id})
    with RecordingRelay() as relay:
        from tests.support.pipeline import fast_settings
        settings = fast_settings(tmp_path, relay_url=relay.url)
        settings.ticker.vanished_after_s = 1.0
        async with running_node(settings, fresh_nats.url, database_url,
                                roles=frozenset({"ticker", "dispatcher"})):
            async def delivered():
                return (await DeliveryLedger(engine).delivery(run.id)).run.delivery_status is DeliveryStatus.delivered
            await until(delivered, 30, "the lost result delivered by recovery")
        assert [r for r in relay.accepted if r.idempotency_key == run.id], relay.requests
