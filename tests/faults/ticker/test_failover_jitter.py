"""The ticker leader SIGSTOPped past its lease while jittered slots wait to be fired: the new
leader neither re-fires nor drops them. They are not downtime (their fire time has not come,
or came less than `late_grace_s` before the new leader loaded, then it fires them at once as
catch-up), so they fire once each, counted by the agents. (A slot whose fire time passed
longer ago than that while no leader ran is downtime: the job's catch-up rule, `none` here,
writes it `missed`. A slow failover on a loaded machine makes some; they are checked so.)

Before the fix, a new leader treated such a slot (older than `late_grace_s`) as downtime, and
the job's catch-up rule (`none` here) wrote it `missed`."""

from __future__ import annotations

import asyncio
import signal
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from kjob._time import utcnow
from kjob.bus.publish import announce_job_changed
from kjob.bus.setup import connect
from kjob.model.policies import fire_time
from kjob.model.run import RunStatus, Trigger
from kjob.model.schedule import Schedule
from kjob.store.jobs import JobStore
from kjob.store.tables import ticker_lease
from tests.faults.ticker.conftest import ledger_rows
from tests.support.nodes import SchedulerProcess
from tests.support.pipeline import ACTOR, create_job, until

pytestmark = pytest.mark.slow

EVERY = 20
JITTER = timedelta(seconds=10)
#: Shorter than the jitter, longer than a failover: a slot still waiting for its jitter when
#: the leader stops is older than this by the time the new leader loads.
GRACE_S = 6
#: The leader stops this long after a slot (more than the grace: the slot is older than that
#: when the new leader loads, so only its jitter keeps it from being downtime); a third of the
#: jobs still wait for theirs.
STOP_AFTER_S = 7
JOBS = 16
MISSED = "scheduler was down at this slot; catch-up policy 'none' did not run it"


async def leader(engine) -> tuple[str, int] | None:
    async with engine.connect() as conn:
        row = (await conn.execute(select(ticker_lease.c.node, ticker_lease.c.revision))).first()
    return (row.node, row.revision) if row else None


async def fenced_at(engine) -> datetime:
    """When the current leader wrote its fence: just before it loaded the jobs."""
    async with engine.connect() as conn:
        return (await conn.execute(select(ticker_lease.c.acquired_at))).scalar_one()


async def test_a_new_leader_fires_the_old_leaders_pending_jittered_slots_once(
        tmp_path, fresh_nats, database_url, engine, recorder):
    schedule = f"@every {EVERY}s"
    jobs = [await create_job(engine, slug=f"jittered-{i}", prompt=recorder.script(seconds=0.05), schedule=schedule,
                             jitter="10s", overlap="allow", catchup={"policy": "none"}) for i in range(JOBS)]
    env = {
        "KJOB_NATS_URL": fresh_nats.url, "KJOB_DATABASE_URL": database_url, "KJOB_ACK_WAIT_S": "6",
        "KJOB_EXECUTOR__HEARTBEAT_S": "0.5", "KJOB_EXECUTOR__CLAIM_LEASE_S": "4", "KJOB_EXECUTOR__CLAIM_MARGIN_S": "1",
        "KJOB_EXECUTOR__SANDBOXES": '["process"]', "KJOB_TICKER__LATE_GRACE_S": str(GRACE_S),
        "KJOB_TICKER__RECOVER_S": "2", **recorder.env(),
        # a lease a little longer than production's: on a loaded machine a 1.2 s lease also
        # changes hands on its own, and this test is about the one failover it makes
        "KJOB_TICKER__LEASE_TTL_S": "3", "KJOB_TICKER__LEASE_RENEW_S": "0.5",
    }
    # Ticker-only candidates and an executor apart: the SIGSTOP is the ticker's fault here (an
    # executor stopped mid-run is the executor's fault suite's).
    nodes = {name: SchedulerProcess(name, tmp_path, env, roles="ticker") for name in ("t-1", "t-2")}
    nodes["e-1"] = SchedulerProcess("e-1", tmp_path, env, roles="executor")
    try:
        for node in nodes.values():
            node.start()
        first = await until(lambda: leader(engine), 40, "a leader")
        # Stop the leader STOP_AFTER_S into a slot: the jobs whose jitter is longer wait.
        sched = Schedule.parse(schedule)
        slot = sched.next_slot(utcnow() + timedelta(seconds=2))
        await asyncio.sleep((slot + timedelta(seconds=STOP_AFTER_S) - utcnow()).total_seconds())
        nodes[first[0]].signal(signal.SIGSTOP)
        stopped_at = utcnow()
        pending = [j for j in jobs if fire_time(j.id, sched, "UTC", slot, JITTER) > stopped_at]
        second = await until(lambda: _other(engine, first), 30, "a new leader")
        assert second[0] != first[0]
        loaded = await fenced_at(engine)
        await asyncio.sleep(1.5)
        nodes[first[0]].signal(signal.SIGCONT)
        # Until every jitter of the slot has passed; then end the window.
        after = slot
        await asyncio.sleep(max(0.0, (slot + JITTER - utcnow()).total_seconds()) + 1)
        store = JobStore(engine)
        nc = await connect(fresh_nats.url, "jitter-test")
        for job in jobs:
            await store.set_enabled(ACTOR, job.slug, False, note="end of window")
            await announce_job_changed(nc.jetstream(), job.tenant, job.id, job.slug, "disabled")
        await nc.close()

        async def settled():
            for job in jobs:
                for r in await ledger_rows(engine, job.id):
                    if r.slot <= after and not RunStatus(r.status).final:
                        return False
            return True
        await until(settled, 40, "every slot of the window to end")
    finally:
        codes = {name: node.stop() for name, node in nodes.items()}
        logs = {name: node.logs() for name, node in nodes.items()}

    grace = timedelta(seconds=GRACE_S)
    # pending when the new leader loaded (2 s of margin for its own reads): must run
    judged = [j for j in pending if fire_time(j.id, sched, "UTC", slot, JITTER) >= loaded - grace + timedelta(seconds=2)]
    # fire time passed a grace before any leader could fire it: downtime, by the rule
    downtime = {j.id for j in pending if fire_time(j.id, sched, "UTC", slot, JITTER) < loaded - grace}
    assert judged, f"no slot was still pending when the new leader loaded ({loaded}): the test proved nothing"
    assert all(code == 0 for code in codes.values()), (codes, logs)
    executions = recorder.by_run()
    for job in jobs:
        rows = [r for r in await ledger_rows(engine, job.id) if r.slot <= after]
        window = [r for r in rows if r.slot >= slot]
        assert [r.slot for r in window] == [slot], (job.slug, [(r.slot, r.status) for r in rows])
        # (slots before the window may be downtime of the nodes' own start: settled by the rule)
        assert all(r.status == RunStatus.succeeded.value or r.reason for r in rows)
        for r in window:
            if r.slot == slot and job.id in downtime:
                assert (r.status, r.reason) == (RunStatus.missed.value, MISSED), (job.slug, r.status, r.reason)
                continue
            if r.slot == slot and job in pending and job not in judged and r.status == RunStatus.missed.value:
                continue  # within the new leader's own reads: either way is right
            # fired by the ticker at its time, or by the new leader's load as a late slot (catch-up)
            late = fire_time(job.id, sched, "UTC", r.slot, JITTER) <= loaded + timedelta(seconds=2)
            assert r.status == RunStatus.succeeded.value and (
                r.trigger == Trigger.schedule.value or (late and r.trigger == Trigger.catchup.value)), \
                (job.slug, r.slot, r.status, r.trigger, r.reason, fire_time(job.id, sched, "UTC", r.slot, JITTER),
                 f"stopped {stopped_at}, new leader fenced {loaded}")
            assert len(executions.get(r.id, [])) == 1, (job.slug, r.slot, r.attempt, r.lost_attempts, [
                (e.node, e.attempt, e.started, e.ended, e.died) for e in executions.get(r.id, [])], stopped_at, first)
    assert not recorder.overlapping()


async def _other(engine, old):
    now = await leader(engine)
    return now if now and now != old else None
