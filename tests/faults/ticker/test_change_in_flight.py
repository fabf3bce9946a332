"""A job change that arrives while the ticker is reloading another changed job is applied at
once, not at the next full resync: the wake-up it sets must survive the reload. Before the
fix the ticker cleared it on going to sleep, and slept until its next slot (here a year off)
or the resync (here ten minutes)."""

from __future__ import annotations

import asyncio

from kjob.bus.publish import announce_job_changed
from kjob.bus.setup import connect, ensure_streams
from kjob.config import TickerSettings
from kjob.store.jobs import JobStore
from kjob.store.slots import SlotLedger
from kjob.ticker.ticker import Ticker
from tests.faults.ticker.conftest import ledger_rows
from tests.support.ledger import fenced_in
from tests.support.pipeline import create_job, until


class GatedJobStore(JobStore):
    """The real store, whose reload of one job waits at a gate the test opens: the moment a
    second change arrives is then certain, not a race."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.entered, self.gate = asyncio.Event(), asyncio.Event()

    async def get_scheduled(self, job_id):
        self.entered.set()
        await self.gate.wait()
        return await super().get_scheduled(job_id)


async def test_a_change_arriving_during_a_reload_is_applied_at_once(fresh_nats, engine):
    nc = await connect(fresh_nats.url, "change-in-flight")
    js = nc.jetstream()
    await ensure_streams(js, 1)
    store = GatedJobStore(engine)
    ticker = Ticker(nc=nc, js=js, jobs=store, ledger=SlotLedger(engine),
                    settings=TickerSettings(resync_s=600, recover_s=600), leadership=await fenced_in(engine))
    stop = asyncio.Event()
    task = asyncio.create_task(ticker.run(stop))
    try:
        await asyncio.sleep(0.5)  # loaded: no jobs yet
        yearly = await create_job(engine, slug="yearly", prompt="true", schedule="0 0 1 1 *")
        await announce_job_changed(js, yearly.tenant, yearly.id, yearly.slug, "created")
        await asyncio.wait_for(store.entered.wait(), 10)  # the ticker is reloading `yearly`
        every = await create_job(engine, slug="every-second", prompt="true")
        await announce_job_changed(js, every.tenant, every.id, every.slug, "created")
        await asyncio.sleep(0.5)  # the event is in
        store.gate.set()
        await until(lambda: ledger_rows(engine, every.id), 5, "the second job's first slot")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await nc.close()
