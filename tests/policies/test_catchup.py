"""Catch-up after downtime, on a real pipeline: jobs whose ledger stops long ago (seeded in the
database, as if the scheduler had been down since), including the 2026 DST changes in New
York. The ticker settles the downtime when it starts: per the job's `catchup`, a slot runs
(trigger `catchup`) or is written `missed` with its reason; none is dropped."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import update

from kjob.model.run import RunStatus, Trigger, run_id_for
from kjob.store.runs import RunLedger, SlotRow
from kjob.store.tables import jobs
from tests.support.pipeline import create_job, fast_settings, running_node, runs_of, until

NY = "America/New_York"
#: 02:30 on March 7-9, 2026 in New York: March 8 has no 02:30 (clocks jump 02:00 -> 03:00 EDT).
SPRING = "30 2 7-9 3 *"
SPRING_SLOTS = ["2026-03-07T07:30Z", "2026-03-08T07:00Z", "2026-03-09T06:30Z"]
#: 01:30 on November 1-2, 2026 in New York: November 1 has 01:30 twice (EDT, then EST).
FALL = "30 1 1-2 11 *"
FALL_SLOTS = ["2026-11-01T05:30Z", "2026-11-02T06:30Z"]
#: Every 30 minutes from 01:00 to 03:59 on March 8: wildcard minutes follow real time.
SPRING_WILDCARD = "*/30 1-3 8 3 *"
SPRING_WILDCARD_SLOTS = ["2026-03-08T06:00Z", "2026-03-08T06:30Z", "2026-03-08T07:00Z", "2026-03-08T07:30Z"]

LONG = "365d"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def down_since(engine, job, moment: str) -> None:
    """Make the job look created (and enabled) at `moment`, before the downtime began."""
    async with engine.begin() as conn:
        await conn.execute(update(jobs).where(jobs.c.id == job.id).values(created_at=at(moment), enabled_at=at(moment)))


async def test_downtime_over_dst_days_is_settled_by_each_jobs_catchup_rule(tmp_path, fresh_nats, database_url, engine):
    queue = {"overlap": "queue", "timezone": NY, "prompt": "echo caught up"}
    spring_all = await create_job(engine, slug="spring-all", schedule=SPRING, catchup={"window": LONG, "policy": "all"}, **queue)
    spring_latest = await create_job(engine, slug="spring-latest", schedule=SPRING, catchup={"window": LONG}, **queue)
    spring_none = await create_job(engine, slug="spring-none", schedule=SPRING, catchup={"window": LONG, "policy": "none"}, **queue)
    spring_1h = await create_job(engine, slug="spring-1h", schedule=SPRING, **queue)  # default: latest within 1h
    fall_all = await create_job(engine, slug="fall-all", schedule=FALL, catchup={"window": LONG, "policy": "all"}, **queue)
    wildcard = await create_job(engine, slug="wildcard", schedule=SPRING_WILDCARD, catchup={"window": LONG, "policy": "all"}, **queue)
    resumed = await create_job(engine, slug="resumed", schedule=SPRING, catchup={"window": LONG, "policy": "all"}, **queue)
    for job in (spring_all, spring_latest, spring_none, spring_1h, wildcard):
        await down_since(engine, job, "2026-03-01T00:00Z")
    await down_since(engine, fall_all, "2026-10-20T00:00Z")
    # `resumed` has its March 7 slot in the ledger: the ticker resumes after it, not before.
    await down_since(engine, resumed, "2026-02-01T00:00Z")
    seeded = at(SPRING_SLOTS[0])
    await RunLedger(engine).record_slots([SlotRow(run_id=run_id_for(resumed.id, seeded), job_id=resumed.id,
                                                  tenant=resumed.tenant, slug=resumed.slug, slot=seeded,
                                                  status=RunStatus.succeeded)])
    expected_runs = [(spring_all, 3), (spring_latest, 1), (fall_all, 2), (wildcard, 4), (resumed, 2)]

    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url):
        async def caught_up():
            for job, n in expected_runs:
                done = [r for r in await runs_of(engine, job) if r.trigger is Trigger.catchup]
                if len(done) != n or not all(r.status is RunStatus.succeeded for r in done):
                    return False
            return True
        await until(caught_up, 30, "every catch-up run to succeed")

    async def ledger(job):
        return [(r.slot, r.trigger, r.status, r.reason) for r in await runs_of(engine, job)]

    caught = (Trigger.catchup, RunStatus.succeeded, None)
    not_run = "scheduler was down at this slot; catch-up policy '{}' did not run it"
    assert await ledger(spring_all) == [(at(s), *caught) for s in SPRING_SLOTS]
    assert await ledger(spring_latest) == [
        (at(SPRING_SLOTS[0]), Trigger.schedule, RunStatus.missed, not_run.format("latest")),
        (at(SPRING_SLOTS[1]), Trigger.schedule, RunStatus.missed, not_run.format("latest")),
        (at(SPRING_SLOTS[2]), *caught),
    ]
    assert await ledger(spring_none) == [
        (at(s), Trigger.schedule, RunStatus.missed, not_run.format("none")) for s in SPRING_SLOTS
    ]
    outside = "scheduler was down at this slot, which is outside the catch-up window (1h)"
    assert await ledger(spring_1h) == [(at(s), Trigger.schedule, RunStatus.missed, outside) for s in SPRING_SLOTS]
    # the repeated 01:30 on November 1 runs once
    assert await ledger(fall_all) == [(at(s), *caught) for s in FALL_SLOTS]
    assert await ledger(wildcard) == [(at(s), *caught) for s in SPRING_WILDCARD_SLOTS]
    assert await ledger(resumed) == [
        (seeded, Trigger.schedule, RunStatus.succeeded, None), *[(at(s), *caught) for s in SPRING_SLOTS[1:]]
    ]
    # a catch-up run has the slot's own run key, like the scheduled run it stands for
    assert {r.id for r in await runs_of(engine, spring_all)} == {run_id_for(spring_all.id, at(s)) for s in SPRING_SLOTS}


async def test_catchup_all_under_overlap_skip_runs_one_and_records_the_others_skipped(tmp_path, fresh_nats,
                                                                                       database_url, engine):
    # The catch-up runs start together; `skip` lets one in and records the rest with the reason.
    job = await create_job(engine, slug="all-skip", schedule=SPRING, timezone=NY, prompt="sleep 2",
                           catchup={"window": LONG, "policy": "all"})
    await down_since(engine, job, "2026-03-01T00:00Z")
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url):
        async def settled():
            runs = await runs_of(engine, job)
            return len(runs) == 3 and all(r.status.final for r in runs) and runs
        runs = await until(settled, 20, "the three catch-up slots to end")
    assert sorted(r.status.value for r in runs) == ["skipped", "skipped", "succeeded"]
    assert all(r.trigger is Trigger.catchup for r in runs)
    assert all(r.reason.startswith("previous run ") for r in runs if r.status is RunStatus.skipped)
