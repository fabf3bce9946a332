"""Long downtime, made by moving the ledger's cursor back (not by waiting): when the ticker
starts, every slot of every job since its cursor is accounted for, run by the catch-up rule
judged on the newest slots, or missed with its reason, one by one or in a compact range that
`GET /v1/jobs/{slug}/missed` and `kjob runs` show. A job whose stored catch-up window is
beyond the calendar is settled too, and stops nobody.

Before the fix, `@every 1s` down 20 minutes left 200 slots neither run nor recorded, and
`* * * * *` down 20 hours with a 1 h window ran no catch-up at all; the 99999999-day window
crashed the ticker at every start."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from sqlalchemy import text, update

from kjob._time import utcnow
from kjob.model.job import CatchupPolicy
from kjob.model.run import RunStatus, Trigger
from kjob.store.tables import jobs
from tests.faults.ticker.conftest import ledger_rows, node_settings, range_rows, slots_between
from tests.cli.conftest import base_env, home, runner_for  # noqa: F401 (fixtures)
from tests.support.pipeline import create_job, running_node, until



async def down_since(engine, job, moment: datetime) -> None:
    """The job's cursor: created (and enabled) at `moment`, nothing in the ledger since."""
    async with engine.begin() as conn:
        await conn.execute(update(jobs).where(jobs.c.id == job.id).values(created_at=moment, enabled_at=moment))


async def fired_after(engine, job, moment: datetime):
    """The first slot after `moment` that ran, once it has."""
    rows = await ledger_rows(engine, job.id)
    return next((r for r in rows if r.slot > moment and r.status == RunStatus.succeeded.value), None)


async def newest_minute_ran(engine, job, started: datetime):
    """`latest` runs the newest missed minute, as a catch-up. Returns the runs up to it that ran."""
    newest = started.replace(second=0, microsecond=0)
    rows = await ledger_rows(engine, job.id)
    ran = [r for r in rows if r.slot <= newest and r.status == RunStatus.succeeded.value]
    return ran if any(r.slot == newest for r in ran) else None


def assert_caught_up_once(ran: list, started: datetime) -> None:
    (minute,) = ran  # one ran, no older one
    # a late slot (even one younger than the grace) runs as a catch-up; only a minute that
    # began while the node was loading may have been fired by the ticker at its time
    assert minute.trigger == Trigger.catchup.value or minute.slot >= started - timedelta(seconds=5)


async def test_every_second_job_down_20_minutes_has_every_slot_accounted_for(
        tmp_path, fresh_nats, database_url, engine, recorder, api, base_env):
    now = utcnow()
    job = await create_job(engine, slug="every-second", prompt=recorder.script(seconds=0.05))
    await down_since(engine, job, now - timedelta(minutes=20))
    async with running_node(node_settings(tmp_path, recorder), fresh_nats.url, database_url) as node:
        started = utcnow()
        live = await until(lambda: fired_after(engine, job, started), 30, "the job to fire after the start")

        async def final():
            return all(RunStatus(r.status).final for r in await ledger_rows(engine, job.id) if r.slot <= live.slot)
        await until(final, 30, "the late slots to end")
        client = await api(node, role="viewer")
        shown = (await client.get("/v1/jobs/every-second/missed")).json()
        token = client.headers["Authorization"].removeprefix("Bearer ")
        cli = runner_for({**base_env, "KJOB_API_URL": node.api_url, "KJOB_TOKEN": token})
        printed = await asyncio.to_thread(cli, "runs", "every-second", "--limit", "5")

    expected = slots_between("@every 1s", now - timedelta(minutes=20), live.slot)
    rows = [r for r in await ledger_rows(engine, job.id) if r.slot <= live.slot]
    ranges = await range_rows(engine, job.id)
    in_ranges = sum(r.count for r in ranges)
    assert len(rows) + in_ranges == len(expected), f"{len(rows)} rows + {in_ranges} in ranges for {len(expected)} slots"
    assert len(rows) == len({r.slot for r in rows})
    assert ranges[0].first_slot == expected[0] and all(r.count_exact for r in ranges)
    assert ranges[-1].last_slot < rows[0].slot
    listed = {r.slot for r in rows}
    assert all(s in listed for s in expected if s > ranges[-1].last_slot)
    # the newest late slot ran as a catch-up, every other slot is missed, each with its reason
    assert all(r.status in ("missed", "succeeded", "skipped") and (r.status == "succeeded" or r.reason) for r in rows)
    assert any(r.status == "missed" and r.reason.startswith("scheduler was down at this slot") for r in rows)
    assert all(r.reason_code in ("outside_catchup_window", "catchup_policy") for r in rows if r.status == "missed")
    # the API shows each range's sentence and its code
    assert [(r["count"], r["reason"], r["reason_code"]) for r in shown] == [
        (r.count, r.reason, r.reason_code) for r in reversed(ranges)]
    assert {r["reason_code"] for r in shown} <= {"outside_catchup_window", "catchup_policy"}
    assert printed.exit_code == 0, printed.output
    assert f"missed: {ranges[0].count} slots from " in printed.output, printed.output
    assert all(len(e) == 1 for e in recorder.by_run().values())


async def test_every_minute_job_down_20_hours_runs_its_newest_missed_minute(
        tmp_path, fresh_nats, database_url, engine, recorder):
    now = utcnow()
    job = await create_job(engine, slug="every-minute", prompt=recorder.script(seconds=0.05), schedule="* * * * *",
                           catchup={"window": "1h", "policy": "latest"})
    await down_since(engine, job, now - timedelta(hours=20))
    async with running_node(node_settings(tmp_path, recorder), fresh_nats.url, database_url):
        started = utcnow()
        ran = await until(lambda: newest_minute_ran(engine, job, started), 30, "the newest missed minute to run")

    assert_caught_up_once(ran, started)
    rows = [r for r in await ledger_rows(engine, job.id) if r.slot <= ran[0].slot]
    ranges = await range_rows(engine, job.id)
    expected = slots_between("* * * * *", now - timedelta(hours=20), ran[0].slot)
    assert len(rows) + sum(r.count for r in ranges) == len(expected)
    assert [(r.reason, r.reason_code) for r in ranges] == [
        ("scheduler was down at these slots, outside the catch-up window (1h)", "outside_catchup_window")]
    assert all(len(e) == 1 for e in recorder.by_run().values())


async def test_a_stored_window_beyond_the_calendar_stops_nobody(tmp_path, fresh_nats, database_url, engine, recorder,
                                                                caplog):
    now = utcnow()
    huge = await create_job(engine, slug="huge-window", prompt=recorder.script(seconds=0.05), schedule="* * * * *")
    bystander = await create_job(engine, slug="bystander", prompt="true")
    await down_since(engine, huge, now - timedelta(hours=3))
    # a row stored before create-time bounds existed: the window overflows any date maths
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE jobs SET spec = jsonb_set(spec, '{catchup,window}', '\"99999999d\"') "
                                "WHERE id = :id"), {"id": huge.id})
    try:  # the model's create-time bound refuses it: the ticker skips the row, logged and counted
        CatchupPolicy.model_validate({"window": "99999999d"})
        refused = False
    except ValueError:
        refused = True
    caplog.set_level(logging.ERROR, logger="kjob")
    async with running_node(node_settings(tmp_path, recorder), fresh_nats.url, database_url):
        started = utcnow()
        await until(lambda: fired_after(engine, bystander, started), 30, "the other job to fire")
        if not refused:  # read as is: the window is clamped to the calendar, the newest minute runs
            ran = await until(lambda: newest_minute_ran(engine, huge, started), 30, "the newest missed minute to run")
            assert_caught_up_once(ran, started)
    if refused:
        assert any("huge-window" in r.getMessage() and "is skipped" in r.getMessage() for r in caplog.records)
        assert await ledger_rows(engine, huge.id) == []
