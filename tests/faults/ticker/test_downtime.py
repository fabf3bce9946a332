"""Long downtime, made by moving the ledger's cursor back (not by waiting): when the ticker
starts, every slot of every job since its cursor is accounted for, run by the catch-up rule
judged on the newest slots, or missed with its reason, one by one or in a compact range that
`GET /v1/jobs/{slug}/missed` and `kjob runs` show. A job whose stored catch-up window is
beyond the calendar is settled too, and stops nobody.

Before the fix, `@every 1s` down 20 minutes left 200 slots neither run nor recorded, and
`* * * * *` down 20 hours with a 1 h window ran no catch-up at all; the 99999999-day window
crashed the ticker at every start."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import text, update

from kjob.model.run import RunStatus, Trigger
from kjob.store.tables import jobs
from tests.faults.ticker.conftest import ledger_rows, node_settings, range_rows, slots_between
from tests.support.pipeline import create_job, running_node, until


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


async def down_since(engine, job, moment: datetime) -> None:
    """The job's cursor: created (and enabled) at `moment`, nothing in the ledger since."""
    async with engine.begin() as conn:
        await conn.execute(update(jobs).where(jobs.c.id == job.id).values(created_at=moment, enabled_at=moment))


async def test_after_long_downtime_every_slot_is_run_or_missed_with_its_reason(
        tmp_path, fresh_nats, database_url, engine, recorder, api):
    prompt = recorder.script(seconds=0.05)
    now = utcnow()
    seconds_job = await create_job(engine, slug="every-second", prompt=prompt)
    minutes_job = await create_job(engine, slug="every-minute", prompt=prompt, schedule="* * * * *",
                                   catchup={"window": "1h", "policy": "latest"})
    huge = await create_job(engine, slug="huge-window", prompt=prompt, schedule="* * * * *")
    bystander = await create_job(engine, slug="bystander", prompt=prompt)
    await down_since(engine, seconds_job, now - timedelta(minutes=20))
    await down_since(engine, minutes_job, now - timedelta(hours=20))
    await down_since(engine, huge, now - timedelta(hours=3))
    # a row stored before create-time bounds existed: the window overflows any date maths
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE jobs SET spec = jsonb_set(spec, '{catchup,window}', '\"99999999d\"') "
                                "WHERE id = :id"), {"id": huge.id})

    async with running_node(node_settings(tmp_path, recorder), fresh_nats.url, database_url) as node:
        started = utcnow()

        async def live(job):
            """The first slot the ticker fired after it started, once it ran."""
            rows = await ledger_rows(engine, job.id)
            return next((r for r in rows if r.slot > started and r.status == RunStatus.succeeded.value), None)

        first_live = {job.slug: await until(lambda: live(job), 30, f"{job.slug} to fire after the start")
                      for job in (seconds_job, bystander)}

        # `latest` runs the newest missed minute: as a catch-up, or as merely late (trigger
        # `schedule`) when it is younger than `late_grace_s`; no older one runs.
        newest_minute = started.replace(second=0, microsecond=0)

        async def caught_up(job):
            rows = await ledger_rows(engine, job.id)
            return [r for r in rows if r.slot <= newest_minute and r.status == RunStatus.succeeded.value]

        catchups = {job.slug: await until(lambda: caught_up(job), 30, f"{job.slug}'s newest missed minute to run")
                    for job in (minutes_job, huge)}
        async def final(job, until_slot):
            return all(RunStatus(r.status).final for r in await ledger_rows(engine, job.id) if r.slot <= until_slot)
        await until(lambda: final(seconds_job, first_live["every-second"].slot), 30, "the late slots to end")
        client = await api(node, role="viewer")
        shown = (await client.get("/v1/jobs/every-second/missed")).json()

    # @every 1s, down 20 min: every slot up to the first live one is in the ledger or a range
    expected = slots_between("@every 1s", now - timedelta(minutes=20), first_live["every-second"].slot)
    rows = [r for r in await ledger_rows(engine, seconds_job.id) if r.slot <= first_live["every-second"].slot]
    ranges = await range_rows(engine, seconds_job.id)
    assert len(rows) == len({r.slot for r in rows})
    in_ranges = sum(r.count for r in ranges)
    assert len(rows) + in_ranges == len(expected), (len(rows), in_ranges, len(expected))
    assert ranges and ranges[0].first_slot == expected[0] and all(r.count_exact for r in ranges)
    assert ranges[-1].last_slot < rows[0].slot
    listed = {r.slot for r in rows}
    assert all(s in listed for s in expected if s > ranges[-1].last_slot)
    missed = [r for r in rows if r.status == RunStatus.missed.value]
    assert missed and all(r.reason.startswith("scheduler was down at this slot") for r in missed)
    # the late slots ran as scheduled (those that came while another ran: `skipped`, the
    # overlap policy's say), every other slot is missed
    assert all(r.status in ("missed", "succeeded", "skipped") and (r.status == "succeeded" or r.reason) for r in rows)
    # the API shows the range
    assert [(r["count"], r["reason"]) for r in shown] == [(r.count, r.reason) for r in reversed(ranges)]

    # * * * * *, down 20 h, 1 h window, `latest`: the newest missed minute ran, not an old one
    (minute,) = catchups["every-minute"]
    assert minute.slot == newest_minute
    late = started - minute.slot <= timedelta(seconds=15)
    assert minute.trigger == (Trigger.schedule if late else Trigger.catchup).value
    minute_rows = [r for r in await ledger_rows(engine, minutes_job.id) if r.slot <= minute.slot]
    minute_ranges = await range_rows(engine, minutes_job.id)
    expected_minutes = slots_between("* * * * *", now - timedelta(hours=20), minute.slot)
    assert len(minute_rows) + sum(r.count for r in minute_ranges) == len(expected_minutes)
    assert [r.reason for r in minute_ranges] == [
        "scheduler was down at these slots, outside the catch-up window (1h)"]

    # the 99999999-day window: clamped, settled, its newest slot run; and the bystander fired
    assert [r.slot for r in catchups["huge-window"]] == [newest_minute]
    assert first_live["bystander"].slot - started < timedelta(seconds=10)
    # every run the agents report ran once
    assert all(len(e) == 1 for e in recorder.by_run().values())
