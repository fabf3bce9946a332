"""Run history retention on a real PostgreSQL, and in the background of a running node."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import select, text, update

from kjob.model.run import DeliveryStatus, RunStatus, Trigger, run_id_for
from kjob.store.retention import prune
from kjob.store.slots import SlotLedger, SlotRow
from kjob.store.tables import job_runs, run_attempts
from tests.support.ledger import record_slots
from tests.support.pipeline import create_job, fast_settings, running_node, runs_of, until

NOW = datetime.now(timezone.utc).replace(microsecond=0)


async def seed(engine, job, hours_ago: list[int], *, status=RunStatus.succeeded, trigger=Trigger.schedule,
               finished_days_ago: float = 0, delivery=DeliveryStatus.delivered) -> list[str]:
    """Runs of `job` at the given slots (hours before NOW), with their end and delivery."""
    rows = [SlotRow(run_id=run_id_for(job.id, NOW - timedelta(hours=h)), job_id=job.id, tenant=job.tenant,
                    slug=job.slug, slot=NOW - timedelta(hours=h), trigger=trigger, status=status) for h in hours_ago]
    await record_slots(engine, rows)
    ids = [r.run_id for r in rows]
    async with engine.begin() as conn:
        await conn.execute(update(job_runs).where(job_runs.c.id.in_(ids)).values(
            finished_at=(NOW - timedelta(days=finished_days_ago)) if status.final else None,
            delivery_status=delivery.value))
    return ids


async def slots_left(engine, job) -> list[int]:
    return sorted(round((NOW - r.slot) / timedelta(hours=1)) for r in await runs_of(engine, job))


async def test_keep_runs_keeps_the_newest_and_never_an_open_or_undelivered_run(engine):
    job = await create_job(engine, slug="noisy", prompt="true", schedule="0 * * * *", history={"keep_runs": 3})
    await seed(engine, job, list(range(1, 11)))
    await seed(engine, job, [20], status=RunStatus.retrying)  # open: never pruned
    await seed(engine, job, [21], delivery=DeliveryStatus.pending)  # its result waits for Relay
    untouched = await create_job(engine, slug="keeps-all", prompt="true", schedule="0 * * * *")
    await seed(engine, untouched, list(range(1, 11)))

    assert await prune(engine, now=NOW) == 7
    assert await slots_left(engine, job) == [1, 2, 3, 20, 21]
    assert await slots_left(engine, untouched) == list(range(1, 11))
    assert await prune(engine, now=NOW) == 0


async def test_keep_days_prunes_runs_that_finished_before_the_cutoff(engine):
    job = await create_job(engine, slug="daily", prompt="true", schedule="0 * * * *", history={"keep_days": 7})
    await seed(engine, job, [200, 199], finished_days_ago=8)
    await seed(engine, job, [150], finished_days_ago=6.5)
    await seed(engine, job, [1])
    assert await prune(engine, now=NOW) == 2
    assert await slots_left(engine, job) == [1, 150]


async def test_the_latest_scheduled_slot_stays_so_a_restart_resumes_after_it(engine):
    # Newer backfill runs push the last scheduled slot out of the newest 2; it stays anyway,
    # or the ticker would resume from the job's creation and call the whole history downtime.
    job = await create_job(engine, slug="resumes", prompt="true", schedule="0 * * * *", history={"keep_runs": 2})
    await seed(engine, job, [30, 20])
    await seed(engine, job, [5, 4, 3], trigger=Trigger.backfill)
    assert await prune(engine, now=NOW) == 2
    assert await slots_left(engine, job) == [3, 4, 20]
    assert (await SlotLedger(engine).last_slots())[job.id] == NOW - timedelta(hours=20)


async def test_a_node_already_pruning_makes_the_others_skip_their_turn(engine):
    job = await create_job(engine, slug="noisy", prompt="true", schedule="0 * * * *", history={"keep_runs": 1})
    await seed(engine, job, [1, 2, 3])
    async with engine.connect() as holder:
        await holder.execute(text("SELECT pg_advisory_lock(hashtextextended('kjob.retention', 0))"))
        assert await prune(engine, now=NOW) is None
        assert len(await slots_left(engine, job)) == 3
        await holder.execute(text("SELECT pg_advisory_unlock(hashtextextended('kjob.retention', 0))"))
    assert await prune(engine, now=NOW) == 2


async def test_a_running_node_prunes_history_in_the_background(tmp_path, fresh_nats, database_url, engine):
    job = await create_job(engine, slug="chatty", prompt="echo hi", schedule="@every 1s", history={"keep_runs": 3})
    settings = fast_settings(tmp_path, history_prune_s=0.5)
    async with running_node(settings, fresh_nats.url, database_url):
        first = None

        async def pruned_while_running():
            nonlocal first
            runs = await runs_of(engine, job)
            first = first or (runs[0].id if runs else None)
            finished = [r for r in runs if r.status.final]
            gone = first is not None and first not in {r.id for r in runs}
            return gone and len(finished) <= 3 and runs[-1].slot - runs[0].slot >= timedelta(seconds=2) and runs
        await until(pruned_while_running, 20, "the first runs to be pruned while new ones keep coming")
    async with engine.connect() as conn:  # the pruned run's attempts went with it
        assert (await conn.execute(select(run_attempts).where(run_attempts.c.run_id == first))).first() is None
