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


async def test_claims_asked_at_once_go_together_and_each_run_is_claimed_once(engine, database_url):
    """Two executors asking for the same 120 runs at once, in opposite orders, each 120 claims
    at a time (a herd delivered twice): every run is claimed by exactly one of them, nobody's
    claim fails (two batches sharing jobs must not deadlock), and each executor's claims went
    in a few transactions, not one each (rows claimed together share their claim's expiry:
    now() + lease, now() being the transaction's start)."""
    jobs = [await create_job(engine, slug=f"herd-{i}", prompt="true", schedule="@every 1h", overlap="allow")
            for i in range(40)]
    slots = SlotLedger(engine)
    runs = [await slots.create_manual(job) for job in jobs for _ in range(3)]  # three of each job
    other = create_engine(database_url, pool_size=5)
    try:
        a, b = ClaimLedger(engine), ClaimLedger(other)
        answers = await asyncio.gather(
            *(a.claim(run.id, "node-a", LEASE) for run in runs),
            *(b.claim(run.id, "node-b", LEASE) for run in reversed(runs)))
    finally:
        await other.dispose()
    claimed = [x for x in answers if isinstance(x, Claimed)]
    assert sorted(c.run.id for c in claimed) == sorted(r.id for r in runs)
    assert all(x is None for x in answers if not isinstance(x, Claimed))
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT claimed_by, count(DISTINCT claim_until) AS transactions, count(*) AS runs "
            "FROM job_runs WHERE status = 'running' GROUP BY claimed_by"))).all()
    assert sum(row.runs for row in rows) == len(runs)
    for row in rows:
        assert row.transactions <= 10, f"{row.claimed_by}: {row.runs} claims in {row.transactions} transactions"
    attempts = [a for run in runs for a in await RunReads(engine).attempts(run.id)]
    assert len(attempts) == len(runs) and {a.attempt for a in attempts} == {1}


async def test_a_run_asked_for_twice_at_once_is_claimed_once(engine):
    """One executor handed the same run twice at once (a message redelivered while the first
    copy waited for its claim): one claim takes it, the other finds it taken."""
    job = await create_job(engine, slug="twice", prompt="true", schedule="@every 1h")
    run = await SlotLedger(engine).create_manual(job)
    ledger = ClaimLedger(engine)
    answers = await asyncio.gather(*(ledger.claim(run.id, "node-1", LEASE) for _ in range(3)))
    assert sum(isinstance(x, Claimed) for x in answers) == 1
    assert [x for x in answers if not isinstance(x, Claimed)] == [None, None]
    assert [a.attempt for a in await RunReads(engine).attempts(run.id)] == [1]


async def test_runs_of_one_skip_job_asked_for_in_one_batch_run_one_at_a_time(engine):
    """Two slots of a `skip` job claimed in one batch, one of them twice: the batch's first
    claim is seen by the second (it is in the same transaction), which is skipped, not run
    beside it; the copy finds its run taken."""
    job = await create_job(engine, slug="skipper", prompt="true", schedule="@every 1h")
    slots = SlotLedger(engine)
    first, second = await slots.create_manual(job), await slots.create_manual(job)
    ledger = ClaimLedger(engine)
    answers = await asyncio.gather(ledger.claim(first.id, "node-1", LEASE), ledger.claim(second.id, "node-1", LEASE),
                                   ledger.claim(first.id, "node-1", LEASE))
    assert sorted(type(x).__name__ for x in answers) == ["Claimed", "NoneType", "Skipped"]
    statuses = sorted(r.status.value for r in [await ledger.run(first.id), await ledger.run(second.id)])
    assert statuses == ["running", "skipped"], statuses


async def test_ends_recorded_at_once_go_together_and_one_refused_fails_alone(engine):
    """Forty attempts end at once: their ends go in a few transactions, each with its own
    output; the one the database refuses (a check constraint) fails alone, and a stale end
    (an attempt whose claim is gone) is void, not an error."""
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE run_logs ADD CONSTRAINT no_refusals CHECK (output NOT LIKE '%refuse-me%')"))
    job = await create_job(engine, slug="enders", prompt="true", schedule="@every 1h", overlap="allow")
    slots, ledger = SlotLedger(engine), ClaimLedger(engine)
    runs = [await slots.create_manual(job) for _ in range(40)]
    for run in runs:
        assert isinstance(await ledger.claim(run.id, "node-1", LEASE), Claimed)

    def end(i: int, run):
        output = "refuse-me" if i == 7 else f"output of {i}"
        return ledger.finish(run.id, "node-1" if i != 9 else "node-stale", 1, status=RunStatus.succeeded, exit_code=0,
                             reason=None, output=output, output_bytes=len(output), dropped_bytes=0, retry_in_s=None)
    answers = await asyncio.gather(*(end(i, run) for i, run in enumerate(runs)), return_exceptions=True)
    assert isinstance(answers[7], asyncpg.CheckViolationError), answers[7]
    assert answers[9] is None
    finished = [a for i, a in enumerate(answers) if i not in (7, 9)]
    assert all(a.status is RunStatus.succeeded for a in finished)
    reads = RunReads(engine)
    for i, run in enumerate(runs):
        if i not in (7, 9):
            assert (await reads.log("default", run.id))[0] == f"output of {i}"
    async with engine.connect() as conn:
        batches = (await conn.execute(text(
            "SELECT count(DISTINCT finished_at) FROM job_runs WHERE status = 'succeeded'"))).scalar_one()
        still = (await conn.execute(text("SELECT count(*) FROM job_runs WHERE status = 'running'"))).scalar_one()
    assert batches <= 10, f"38 ends in {batches} transactions"
    assert still == 2  # the refused one and the stale one's run: theirs to end again


async def test_warming_up_the_ledgers_connections_changes_nothing_and_claims_still_work(engine):
    """The executor warms its connections at start by claiming and ending a run that does not
    exist: no row may come of it, and a run waiting meanwhile is claimed as before."""
    job = await create_job(engine, slug="warm", prompt="true", schedule="@every 1h")
    run = await SlotLedger(engine).create_manual(job)
    ledger = ClaimLedger(engine)

    async def ledger_state():
        async with engine.connect() as conn:
            return (await conn.execute(text(
                "SELECT (SELECT array_agg(id || ':' || status ORDER BY id) FROM job_runs), "
                "(SELECT count(*) FROM run_attempts), (SELECT count(*) FROM run_logs)"))).one()

    before = await ledger_state()
    await ledger.warm_up(connections=3)
    assert await ledger_state() == before
    claimed = await ledger.claim(run.id, "node-1", LEASE)
    assert isinstance(claimed, Claimed) and claimed.run.status is RunStatus.running
