"""What `overlap = "skip"` (the default) means to a user, on a real node (ticker, executor,
gateway on real NATS and PostgreSQL):

- the slots a backfill asks for run one after another, none skipped against another;
- a slot recorded `skipped` never ran, so a backfill runs it (it is not "already there");
- `kjob run-now` of a job whose previous run still runs says the run was skipped, and exits 1;
- after downtime, late slots are judged by the catch-up rule, and those that run are each
  `catchup` runs that wait for one another instead of skipping each other.

Before: a backfill of 3 slots ran 1 and recorded 2 `skipped`, which no backfill could run
again; `run-now` printed "started run ..." of a run then skipped; two late slots fired
together after a restart and the newer was `skipped`; the run catch-up chose kept trigger
`schedule`."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

from sqlalchemy import insert, update

from kjob._time import utcnow
from kjob.model.run import MissReason, RunStatus, Trigger, run_id_for, utc_text
from kjob.model.schedule import next_slots
from kjob.store.tables import job_runs, jobs
from kjob.store.tokens import TokenStore
from tests.policies.conftest import never_overlap, runner_for
from tests.support.pipeline import create_job, fast_settings, running_node, runs_of, until


async def test_a_backfill_under_skip_runs_each_slot_in_turn_and_reruns_a_skipped_one(
        tmp_path, fresh_nats, database_url, engine, node_client):
    job = await create_job(engine, slug="hourly", prompt="sleep 0.4; echo filled", schedule="0 * * * *")  # skip
    start = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    slots = next_slots("0 * * * *", "UTC", start - timedelta(seconds=1), 3)
    # the middle slot came while an earlier run still ran: recorded skipped, it never ran
    async with engine.begin() as conn:
        await conn.execute(insert(job_runs).values(
            id=run_id_for(job.id, slots[1]), job_id=job.id, tenant=job.tenant, slug=job.slug, slot=slots[1],
            trigger="schedule", status="skipped", reason="previous run x still running", reason_code="overlap",
            finished_at=slots[1], delivery_status="none"))
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url) as node:
        api = await node_client(node)
        response = await api.post("/v1/jobs/hourly/backfill", json={"from": utc_text(slots[0]), "to": utc_text(slots[2])})
        assert response.status_code == 202, response.text
        result = response.json()
        assert (result["slots"], result["queued"], result["existing"], result["overlap"]) == (3, 3, 0, "skip")

        async def all_ran():
            runs = await runs_of(engine, job)
            return all(r.status.final for r in runs) and runs
        runs = await until(all_ran, 30, "the three backfilled slots to end")
    assert [(r.slot, r.trigger, r.status) for r in runs] == [(s, Trigger.backfill, RunStatus.succeeded) for s in slots]
    assert [r.reason_code for r in runs] == [None] * 3  # the rerun slot's skip code went with its skip
    never_overlap(runs)
    assert [r.started_at for r in runs] == sorted(r.started_at for r in runs)  # in slot order


async def test_run_now_of_a_busy_skip_job_says_it_was_skipped(tmp_path, fresh_nats, database_url, engine, base_env):
    await create_job(engine, slug="busy", prompt="sleep 8", schedule="0 0 1 1 *")  # skip
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url) as node:
        _, token = await TokenStore(engine).create("default", "operator", "skip test")
        cli = runner_for({**base_env, "KJOB_API_URL": node.api_url, "KJOB_TOKEN": token})
        first = await asyncio.to_thread(cli, "run-now", "busy")
        assert first.exit_code == 0 and first.stdout.startswith("started run "), first.output
        holder = first.stdout.split()[2]
        second = await asyncio.to_thread(cli, "run-now", "busy")
        assert second.exit_code == 1, second.output
        assert "started" not in second.stdout
        assert second.stderr.strip().endswith(f"skipped: previous run {holder} still running; nothing was started")
        # the sentence is for people; `-o json` carries it and the code a program tests
        third = await asyncio.to_thread(cli, "run-now", "busy", "-o", "json")
    assert third.exit_code == 0, third.output
    shown = json.loads(third.stdout)
    assert (shown["status"], shown["reason"], shown["reason_code"]) == (
        "skipped", f"previous run {holder} still running", "overlap")


async def test_late_slots_after_downtime_follow_the_catchup_rule_as_catchup_runs(
        tmp_path, fresh_nats, database_url, engine):
    every = "@every 10s"
    # `all` in a 25 s window: the late slots inside it run, one after another although `skip`
    together = await create_job(engine, slug="all-late", prompt="sleep 0.5", schedule=every,
                                catchup={"window": "25s", "policy": "all"})
    # `latest`: only the newest late slot runs, as a catch-up, even though it is only seconds late
    newest = await create_job(engine, slug="latest-late", prompt="sleep 0.2", schedule=every)
    down_from = utcnow() - timedelta(seconds=65)
    async with engine.begin() as conn:  # down for 65 s: nothing in the ledger since then
        await conn.execute(update(jobs).where(jobs.c.id.in_([together.id, newest.id]))
                           .values(created_at=down_from, enabled_at=down_from))
    started = utcnow()
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url):
        async def late_ones_ended():
            late = [r for job in (together, newest) for r in await runs_of(engine, job) if r.slot <= started]
            caught_ended = any(r.trigger is Trigger.catchup and r.status.final for r in await runs_of(engine, newest))
            return all(r.status.final for r in late) and len(late) >= 12 and caught_ended and late
        await until(late_ones_ended, 30, "every late slot to end")
        late_all = [r for r in await runs_of(engine, together) if r.slot <= started]
        # The newest late slot is judged when the ticker loads, which a loaded machine can put
        # after `started`: it is then a slot after the last one before `started`.
        caught = [r for r in await runs_of(engine, newest) if r.trigger is Trigger.catchup]
        late_latest = [r for r in await runs_of(engine, newest)
                       if r.slot <= max([started, *(c.slot for c in caught)])]

    ran = [r for r in late_all if r.status is RunStatus.succeeded]
    assert len(ran) >= 2 and all(r.trigger is Trigger.catchup for r in ran)
    assert all(started - r.slot < timedelta(seconds=27) for r in ran)  # inside the window (+ the load's time)
    never_overlap(ran)
    others = [r for r in late_all if r not in ran]
    assert others and all(r.status is RunStatus.missed and "outside the catch-up window (25s)" in r.reason
                          and r.reason_code is MissReason.outside_catchup_window for r in others)
    assert not [r for r in late_all + late_latest if r.status is RunStatus.skipped]
    assert len(caught) == 1, caught
    (caught,) = caught
    assert [r for r in late_latest if r.status is not RunStatus.missed] == [caught]
    assert (caught.status, caught.slot) == (RunStatus.succeeded, max(r.slot for r in late_latest))
    assert all("catch-up policy 'latest' did not run it" in r.reason and r.reason_code is MissReason.catchup_policy
               for r in late_latest if r.slot != caught.slot)
