"""Published runs whose due message vanished from the stream (purged here; a stream lost and
re-created is the same to the ledger) are published again by the ticker's recovery loop, and
run once. Before the fix they stayed `scheduled` forever: recovery only looked at runs never
published."""

from __future__ import annotations

from datetime import datetime, timezone

from kjob.bus import names
from kjob.bus.setup import connect
from kjob.model.run import RunStatus
from tests.faults.ticker.conftest import ledger_rows, node_settings
from tests.support.pipeline import create_job, running_node, until


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


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
