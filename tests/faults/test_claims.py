"""The ledger's claim rules that the fault suite leans on, against a real PostgreSQL: lost
attempts are bounded, and a lapsed claim is taken over only after the owner's grace."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import text

from kjob.model.run import MAX_LOST_RETRIES, RunStatus
from kjob.store.runs import Claimed, GaveUp, RunLedger
from tests.support.pipeline import create_job

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
    ledger = RunLedger(engine)
    run = await ledger.create_manual(job)
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
    attempts = await ledger.attempts(run.id)
    assert [a.status for a in attempts] == [RunStatus.lost] * (MAX_LOST_RETRIES + 1)
    assert await ledger.claim(run.id, "node-late", LEASE) is None  # final: nobody runs it again


async def test_a_lapsed_claim_is_taken_over_only_after_the_owners_grace(engine):
    """For half a lease after its claim lapsed, the owner (whose agent it stopped before the
    lapse) may still renew it or write the end it kept; only then may another executor run it."""
    job = await create_job(engine, slug="stalled", prompt="true", schedule="@every 1h")
    ledger = RunLedger(engine)
    run = await ledger.create_manual(job)
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
    import kjob.store.runs as runs_module
    from datetime import datetime, timezone

    job = await create_job(engine, slug="clocked", prompt="true", schedule="@every 1h", overlap="allow")
    ledger = RunLedger(engine)
    live, lapsed = await ledger.create_manual(job), await ledger.create_manual(job)
    for run in (live, lapsed):
        assert isinstance(await ledger.claim(run.id, "owner", LEASE), Claimed)
    await lapse(engine, lapsed.id, 20)
    async with engine.begin() as conn:  # both rows older than the recovery's age limit
        await conn.execute(text("UPDATE job_runs SET created_at = now() - interval '1 minute'"))
    ahead = datetime.now(timezone.utc) + timedelta(seconds=30)
    monkeypatch.setattr(runs_module, "utcnow", lambda: ahead)
    stranded = {r.id for r in await ledger.stranded(timedelta(seconds=5))}
    assert lapsed.id in stranded
    assert live.id not in stranded, "a live claim looked lapsed to a ticker whose clock runs ahead"
