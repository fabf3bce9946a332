"""A leader that stops gives back the slots it queued ahead of their instant (its look-ahead):
only its own, only those not yet due, only while its fence holds. And a slot queued again
after that, whose first message the stream had already let go, gets a message again: the
stream's duplicate window would otherwise drop it (same run id), and the run would wait for
recovery. The whole path, `kjob up` stopped and started over a downtime: tests/pipeline/test_up.py."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from kjob._time import utcnow
from kjob.bus import names
from kjob.bus.setup import connect, ensure_streams
from kjob.config import TickerSettings
from kjob.model.run import RunStatus, Trigger, run_id_for
from kjob.store.jobs import JobStore
from kjob.store.slots import SlotLedger, SlotRow
from kjob.store.tables import job_runs
from kjob.ticker.ticker import Ticker
from tests.support.ledger import fenced_in, record_slots
from tests.support.pipeline import create_job


async def test_a_stopping_leader_withdraws_its_own_slots_ahead_and_nothing_else(engine):
    job = await create_job(engine, slug="beat", prompt="echo beat")
    term = (await fenced_in(engine)).term
    now = utcnow().replace(microsecond=0)

    def row(minutes: float, **fields) -> SlotRow:
        slot = now + timedelta(minutes=minutes)
        return SlotRow(**{"run_id": run_id_for(job.id, slot), "job_id": job.id, "tenant": job.tenant,
                          "slug": job.slug, "slot": slot, "leader_rev": term, **fields})

    ahead, due, manual, running, older_term = (row(5), row(-1), row(6, trigger=Trigger.manual), row(7),
                                               row(8, leader_rev=term - 1))
    await record_slots(engine, [ahead, due, manual, running, older_term])
    async with engine.begin() as conn:
        await conn.execute(job_runs.update().where(job_runs.c.id == running.run_id).values(status="running"))
    ledger = SlotLedger(engine)

    assert await ledger.withdraw_ahead(term + 1) == 0  # not the fence's term: nothing
    assert await ledger.withdraw_ahead(term) == 1

    async with engine.connect() as conn:
        left = set((await conn.execute(select(job_runs.c.id))).scalars())
    assert left == {due.run_id, manual.run_id, running.run_id, older_term.run_id}


async def test_a_slot_queued_again_after_its_message_went_gets_a_message_again(engine, fresh_nats):
    job = await create_job(engine, slug="beat", prompt="echo beat")
    leadership = await fenced_in(engine)
    nc = await connect(fresh_nats.url, "test-ticker")
    try:
        js = nc.jetstream()
        await ensure_streams(js, replicas=1)
        ticker = Ticker(nc=nc, js=js, jobs=JobStore(engine), ledger=SlotLedger(engine), settings=TickerSettings(),
                        leadership=leadership)
        slot = utcnow().replace(microsecond=0) + timedelta(seconds=30)
        row = SlotRow(run_id=run_id_for(job.id, slot), job_id=job.id, tenant=job.tenant, slug=job.slug, slot=slot,
                      status=RunStatus.scheduled, leader_rev=leadership.term)

        async def held() -> int:
            info = await js.stream_info(names.RUNS_STREAM, subjects_filter=names.run_due(job.tenant))
            return (info.state.subjects or {}).get(names.run_due(job.tenant), 0)

        await ticker._publish([row])
        assert await held() == 1
        # Its message goes (an executor found the slot withdrawn and acked it unrun), and the
        # slot is queued again under the same run id, inside the stream's duplicate window.
        first = await js.get_last_msg(names.RUNS_STREAM, names.run_due(job.tenant))
        await js.delete_msg(names.RUNS_STREAM, first.seq)
        assert await held() == 0
        await ticker._publish([row])
        assert await held() == 1, "the slot queued again has no message: the stream dropped it as a duplicate"
    finally:
        await nc.close()
