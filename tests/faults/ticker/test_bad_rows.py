"""One job's bad row never stops the others, on a real PostgreSQL: the ledger leaves out the
slots of jobs deleted or disabled meanwhile (and says which), and a row it refuses for good is
found by halving the batch and left out while the rest are written."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import text

from kjob.config import TickerSettings
from kjob.model.run import RunStatus, run_id_for
from kjob.store.database import is_row_error
from kjob.store.jobs import JobStore
from kjob.store.slots import SlotLedger, SlotRow
from kjob.ticker.ticker import Ticker
from tests.faults.ticker.conftest import ledger_rows
from tests.support.ledger import fenced_in, record_slots
from tests.support.pipeline import ACTOR, create_job

SLOT = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


def row(job, slot=SLOT, slug=None, status=RunStatus.scheduled) -> SlotRow:
    return SlotRow(run_id=run_id_for(job.id, slot), job_id=job.id, tenant=job.tenant, slug=slug or job.slug,
                   slot=slot, status=status)


async def test_slots_of_jobs_gone_or_disabled_are_left_out_and_named(engine):
    live, deleted, paused = [await create_job(engine, slug=s, prompt="true") for s in ("live", "deleted", "paused")]
    await JobStore(engine).delete(ACTOR, "deleted")
    await JobStore(engine).set_enabled(ACTOR, "paused", False)
    rows = [row(live), row(deleted), row(paused), row(paused, SLOT + timedelta(seconds=1), status=RunStatus.missed)]
    recorded = await record_slots(engine, rows)
    assert recorded.new == {rows[0].run_id, rows[3].run_id}  # a missed row of a paused job is history
    assert recorded.gone == {rows[1].run_id, rows[2].run_id}


async def test_a_row_the_ledger_refuses_is_left_out_and_the_rest_written(engine):
    jobs = [await create_job(engine, slug=f"job-{i}", prompt="true") for i in range(9)]
    rows = [row(j) for j in jobs]
    rows[5] = row(jobs[5], slug="x" * 80)  # longer than the column: SQLSTATE 22001, every time
    ledger, leadership = SlotLedger(engine), await fenced_in(engine)
    try:
        await ledger.record_slots(rows, fence=leadership.term)
    except Exception as err:
        assert is_row_error(err)
    else:
        raise AssertionError("the bad row was accepted")
    ticker = Ticker(nc=None, js=None, jobs=JobStore(engine), ledger=ledger, settings=TickerSettings(),
                    leadership=leadership)
    recorded = await ticker._record_rows(rows)
    assert recorded.new == {r.run_id for i, r in enumerate(rows) if i != 5}
    written = [len(await ledger_rows(engine, j.id)) for j in jobs]
    assert written == [1, 1, 1, 1, 1, 0, 1, 1, 1]


async def test_a_stored_row_that_no_longer_reads_is_skipped_and_the_others_listed(engine):
    good, bad = [await create_job(engine, slug=s, prompt="true") for s in ("good", "bad")]
    async with engine.begin() as conn:  # stored before a check that now refuses it
        await conn.execute(text("UPDATE jobs SET spec = jsonb_set(spec, '{catchup,window}', '\"forever\"') "
                                "WHERE id = :id"), {"id": bad.id})
    assert [j.id for j in await JobStore(engine).list_scheduled()] == [good.id]
    assert await JobStore(engine).get_scheduled(bad.id) is None
