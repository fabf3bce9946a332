"""The ledger's claim rules that the fault suite leans on, against a real PostgreSQL: lost
attempts are bounded, and a lapsed claim is taken over only after the owner's grace."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from kjob.executor.watchdog import _RECORD_END_SQL
from kjob.model.run import MAX_LOST_RETRIES, RunStatus
from kjob.store.database import create_engine
from kjob.store.claims import TAKEOVER_GRACE, TAKEOVER_PROMPT, ClaimLedger, Claimed, GaveUp, TakeoverHeld
from kjob.store.runs import RunReads
from kjob.store.slots import SlotLedger
from tests.support.pipeline import create_job, until
from tests.support.tcpproxy import TcpProxy

LEASE = timedelta(seconds=10)


async def lapse(engine, run_id: str, seconds_ago: float) -> None:
    """The claim's owner stopped renewing `seconds_ago` (by the database's clock)."""
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE job_runs SET claim_until = now() - make_interval(secs => :s) WHERE id = :id"),
                           {"s": seconds_ago, "id": run_id})


async def test_a_run_whose_attempts_keep_getting_lost_ends_with_a_reason(engine):
    """An agent that kills its node must not crash-loop the fleet: after MAX_LOST_RETRIES
    lost attempts, the next claim ends the run (`error`, saying why) instead of running it."""
    job = await create_job(engine, slug="node-killer", prompt="true", schedule="@every 1h")
    ledger = ClaimLedger(engine)
    run = await SlotLedger(engine).create_manual(job)
    claimed = await ledger.claim(run.id, "node-1", LEASE)
    assert isinstance(claimed, Claimed)
    for n in range(1, MAX_LOST_RETRIES + 1):
        await lapse(engine, run.id, LEASE.total_seconds())
        claimed = await ledger.claim(run.id, f"node-{n + 1}", LEASE)
        assert isinstance(claimed, Claimed) and claimed.previous_lost and claimed.run.lost_attempts == n
    await lapse(engine, run.id, LEASE.total_seconds())
    ended = await ledger.claim(run.id, "node-last", LEASE)
    assert isinstance(ended, GaveUp)
    assert ended.run.status is RunStatus.error and "lost attempts" in (ended.run.reason or "")
    assert ended.run.finished_at is not None
    attempts = await RunReads(engine).attempts(run.id)
    assert [a.status for a in attempts] == [RunStatus.lost] * (MAX_LOST_RETRIES + 1)
    assert await ledger.claim(run.id, "node-late", LEASE) is None  # final: nobody runs it again


async def test_a_lapsed_claim_is_taken_over_only_after_the_owners_grace(engine):
    """For half a lease after its claim lapsed, the owner (whose agent it stopped before the
    lapse) may still renew it or write the end it kept; only then may another executor run it."""
    job = await create_job(engine, slug="stalled", prompt="true", schedule="@every 1h")
    ledger = ClaimLedger(engine)
    run = await SlotLedger(engine).create_manual(job)
    assert isinstance(await ledger.claim(run.id, "owner", LEASE), Claimed)
    await lapse(engine, run.id, LEASE.total_seconds() / 2 - 2)
    assert await ledger.claim(run.id, "other", LEASE) is None
    assert await ledger.heartbeat(run.id, "owner", 1, LEASE)  # the owner is back in time: still its own
    await lapse(engine, run.id, LEASE.total_seconds() / 2 + 1)
    taken = await ledger.claim(run.id, "other", LEASE)
    assert isinstance(taken, Claimed) and taken.run.attempt == 2
    assert not await ledger.heartbeat(run.id, "owner", 1, LEASE)


async def test_recovery_judges_claims_by_the_databases_clock(engine, monkeypatch):
    """A ticker whose clock runs 30 s ahead must not take live claims for lapsed ones (and
    re-publish every running run); a claim that did lapse is found whatever its clock says."""
    import kjob.store.slots as slots_module
    from datetime import datetime, timezone

    job = await create_job(engine, slug="clocked", prompt="true", schedule="@every 1h", overlap="allow")
    ledger, slots = ClaimLedger(engine), SlotLedger(engine)
    live, lapsed = await slots.create_manual(job), await slots.create_manual(job)
    for run in (live, lapsed):
        assert isinstance(await ledger.claim(run.id, "owner", LEASE), Claimed)
    await lapse(engine, lapsed.id, 20)
    async with engine.begin() as conn:  # both rows older than the recovery's age limit
        await conn.execute(text("UPDATE job_runs SET created_at = now() - interval '1 minute'"))
    ahead = datetime.now(timezone.utc) + timedelta(seconds=30)
    monkeypatch.setattr(slots_module, "utcnow", lambda: ahead)
    stranded = {r.id for r in await slots.stranded(timedelta(seconds=5))}
    assert lapsed.id in stranded
    assert live.id not in stranded, "a live claim looked lapsed to a ticker whose clock runs ahead"


async def test_a_takeover_that_waited_out_a_stall_gives_way_to_the_owners_watchdog(engine, database_url):
    """The owner died as its agent ended and the database stalled: the claim lapsed while
    nobody could write. When the database is back, the other executor's claim (sent during the
    stall) and the owner's watchdog's write of the end are both waiting on it. The claim that
    waited is held (nothing changes), the watchdog's end goes in, and the next claim concludes
    the attempt from it instead of running the agent again."""
    job = await create_job(engine, slug="stalled-end", prompt="true", schedule="@every 1h")
    ledger = ClaimLedger(engine)
    run = await SlotLedger(engine).create_manual(job)
    assert isinstance(await ledger.claim(run.id, "owner", LEASE), Claimed)
    await lapse(engine, run.id, LEASE.total_seconds() * TAKEOVER_GRACE + 1)  # lapsed past the grace

    url = make_url(database_url)
    with TcpProxy(url.host, url.port) as proxy:
        taker_engine = create_engine(url.set(port=proxy.port).render_as_string(hide_password=False), pool_size=1)
        try:
            taker = ClaimLedger(taker_engine)
            async with taker_engine.connect() as conn:  # the session exists before the stall
                await conn.execute(text("SELECT 1"))
            proxy.stall()
            claim = asyncio.create_task(taker.claim(run.id, "other", LEASE))
            async def sent() -> bool:
                return proxy.stalled_bytes > 0

            await until(sent, 10, "the claim to be sent into the stall")
            await asyncio.sleep(LEASE.total_seconds() * TAKEOVER_PROMPT + 0.5)  # the stall lasts
            proxy.resume()
            assert isinstance(await claim, TakeoverHeld), "a claim that waited out a stall took the run over"
            assert (await RunReads(engine).get(run.tenant, run.id)).attempt == 1  # nothing changed
            # The owner's watchdog writes the end (its own statement, as watchdog.py sends it).
            dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
            conn = await asyncpg.connect(dsn)
            try:
                assert await conn.fetchval(_RECORD_END_SQL, run.id, 1, "owner", 0, 0.0)
            finally:
                await conn.close()
            adopted = await taker.claim(run.id, "other", LEASE)
            assert isinstance(adopted, Claimed) and adopted.ended is not None and adopted.ended.exit_code == 0
            assert adopted.run.attempt == 1 and not adopted.previous_lost  # the same attempt, concluded
        finally:
            await taker_engine.dispose()


async def test_an_executor_that_just_lost_the_database_takes_no_claim_over(engine):
    """`takeover=False` (the executor's own statements failed a moment ago): a lapsed claim is
    left to its owner's watchdog for now; a fresh run is claimed as usual."""
    job = await create_job(engine, slug="just-back", prompt="true", schedule="@every 1h", overlap="allow")
    ledger, slots = ClaimLedger(engine), SlotLedger(engine)
    lapsed, fresh = await slots.create_manual(job), await slots.create_manual(job)
    assert isinstance(await ledger.claim(lapsed.id, "owner", LEASE), Claimed)
    await lapse(engine, lapsed.id, LEASE.total_seconds())
    assert isinstance(await ledger.claim(lapsed.id, "other", LEASE, takeover=False), TakeoverHeld)
    assert (await RunReads(engine).attempts(lapsed.id))[0].status is RunStatus.running
    assert isinstance(await ledger.claim(fresh.id, "other", LEASE, takeover=False), Claimed)
    taken = await ledger.claim(lapsed.id, "other", LEASE)
    assert isinstance(taken, Claimed) and taken.previous_lost and taken.run.attempt == 2
