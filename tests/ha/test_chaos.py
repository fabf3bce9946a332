"""Chaos: a 3-node JetStream cluster (R3 streams), two scheduler nodes, every-second jobs, while
the leader is SIGKILLed, paused past its lease, one NATS node dies and PostgreSQL restarts.
Afterwards, counted by the agents themselves (tests/support/recorder.py): every slot of the window
ran to its end exactly once, or not at all with the ledger saying why, and no two executions of a
run overlapped; Relay got each run's result under one Idempotency-Key; no deposed leader wrote a
slot."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, text

from kjob._time import utcnow
from kjob.bus.publish import announce_job_changed
from kjob.bus.setup import connect
from kjob.embedded import EmbeddedPostgres
from kjob.model.run import DeliveryStatus, RunStatus
from kjob.store.database import create_engine, migrate
from kjob.store.jobs import JobStore
from kjob.store.overlap import DISABLED_REASON
from kjob.store.tables import job_runs, run_attempts, ticker_lease
from tests.faults.harness import ended_during, judge
from tests.support.nodes import SchedulerProcess
from tests.support.pipeline import ACTOR, create_job, until
from tests.support.recorder import Recorder
from tests.support.relay import RecordingRelay

pytestmark = pytest.mark.slow

JOBS = 3


async def leader(engine) -> tuple[str, int] | None:
    async with engine.connect() as conn:
        row = (await conn.execute(select(ticker_lease.c.node, ticker_lease.c.revision))).first()
    return (row.node, row.revision) if row else None


async def slots_since(engine, since: datetime) -> int:
    async with engine.connect() as conn:
        return (await conn.execute(text("SELECT count(*) FROM job_runs WHERE created_at > :t"), {"t": since})).scalar()


async def new_leader(engine, old: tuple[str, int] | None, timeout: float = 20, *, not_on: str | None = None
                     ) -> tuple[str, int]:
    """A leader other than `old`; with `not_on`, on another node (a loaded machine may see the
    old node re-elected under a new revision just before it was killed or paused)."""
    async def changed():
        now = await leader(engine)
        return now if now and now != old and now[0] != not_on else None
    return await until(changed, timeout, f"a new leader after {old}")


async def flowing(engine, seconds: float = 3.0) -> None:
    """Slots keep being recorded: wait until `seconds` worth of new ones exist."""
    since = datetime.now().astimezone()
    await until(lambda: _at_least(engine, since, int(seconds * JOBS)), 30, f"{seconds}s of slots to be recorded")


async def _at_least(engine, since, n):
    try:
        return await slots_since(engine, since) >= n
    except Exception:  # the test's own pool after a PostgreSQL restart: one error, then fresh connections
        return False


async def test_chaos_every_slot_once(tmp_path, nats_cluster):
    cluster = nats_cluster(3)
    pg = EmbeddedPostgres(tmp_path / "pg", durable=False).start()
    with RecordingRelay() as relay, Recorder() as recorder:
        db_url = pg.ensure_database("chaos")
        await migrate(db_url)
        engine = create_engine(db_url)
        env = {
            "KJOB_NATS_URL": cluster.url, "KJOB_DATABASE_URL": db_url, "KJOB_RELAY_URL": relay.url,
            "KJOB_STREAM_REPLICAS": "3", "KJOB_ACK_WAIT_S": "6",
            "KJOB_EXECUTOR__HEARTBEAT_S": "0.5", "KJOB_EXECUTOR__CLAIM_LEASE_S": "3",
            "KJOB_EXECUTOR__SANDBOXES": '["process"]',
            "KJOB_TICKER__RECOVER_S": "2", "KJOB_DISPATCHER__RETRY_MAX_S": "2",
            "KJOB_EXECUTOR__CLAIM_MARGIN_S": "1",
            **recorder.env(),
        }
        nodes = {name: SchedulerProcess(name, tmp_path, env) for name in ("sched-1", "sched-2")}
        #: (node, from, to) on the recorder's clock: when a node's executor could record nothing
        outages: list[tuple[str, float, float]] = []
        try:
            # overlap "allow": a run stuck on a paused node must not turn later slots into `skipped`;
            # this test is about exactly-once, the overlap policy has its own tests.
            jobs = [await create_job(engine, slug=f"beat-{i}", prompt=recorder.script(0.2), schedule="@every 1s",
                                     output={"channel": "ops"}, overlap="allow") for i in range(JOBS)]
            for node in nodes.values():
                node.start()
            first = await new_leader(engine, None, 40)
            await flowing(engine)

            # 1. SIGKILL the leader; the standby takes over; the killed node comes back.
            nodes[first[0]].kill()
            outages.append((first[0], time.monotonic(), time.monotonic()))
            second = await new_leader(engine, first, not_on=first[0])
            assert second[0] != first[0]
            await flowing(engine)
            nodes[first[0]].start()

            # 2. SIGSTOP the leader past its lease, then SIGCONT: it must find itself deposed.
            nodes[second[0]].signal(signal.SIGSTOP)
            paused = time.monotonic()
            third = await new_leader(engine, second, not_on=second[0])
            assert third[0] != second[0]
            await flowing(engine)
            nodes[second[0]].signal(signal.SIGCONT)
            outages.append((second[0], paused, time.monotonic()))
            await flowing(engine)

            # 3. Kill one NATS node, run on two, restart it.
            cluster.nodes[1].kill()
            await flowing(engine)
            cluster.nodes[1].start()
            await flowing(engine)

            # 4. Restart PostgreSQL.
            await asyncio.to_thread(pg.stop)
            await asyncio.to_thread(pg.start)
            await flowing(engine, 4)

            # End of the window: pause the jobs, let everything in flight finish and deliver.
            store = JobStore(engine)
            nc = await connect(cluster.url, "chaos-test")
            disabled_at = utcnow()
            for job in jobs:
                await store.set_enabled(ACTOR, job.slug, False, note="end of chaos window")
                await announce_job_changed(nc.jetstream(), job.tenant, job.id, job.slug, "disabled")
            await nc.close()

            async def settled():
                async with engine.connect() as conn:
                    open_runs = (await conn.execute(text(
                        "SELECT slug, slot, status, attempt, delivery_status, claimed_by, claim_until, published_at "
                        "FROM job_runs WHERE status IN ('scheduled','running','retrying') "
                        "OR delivery_status = 'pending' ORDER BY slot LIMIT 5"))).all()
                left[:] = open_runs
                return not open_runs
            left: list = []
            try:
                await until(settled, 90, "every run final and delivered")
            except AssertionError as err:
                raise AssertionError(f"{err}; still open: {left}") from None
        finally:
            codes = {name: node.stop() for name, node in nodes.items()}
            logs = {name: node.logs() for name, node in nodes.items()}

        async with engine.connect() as conn:
            rows = (await conn.execute(select(job_runs).order_by(job_runs.c.created_at))).all()
            attempts = (await conn.execute(select(run_attempts))).all()
        await engine.dispose()
        # Every slot one second apart, and each ran to its end once as its agent counted it (or
        # not at all, missed with a reason); no two executions of a run at once.
        # An agent that ended as its node was killed or paused, before the end could be
        # written, runs again after the lease (README, "Left"): counted apart, never beside itself.
        verdict = judge(jobs, sorted(rows, key=lambda r: r.slot), attempts, recorder,
                        lambda e: ended_during(outages, e))
    pg.stop()

    assert all(code == 0 for code in codes.values()), (codes, logs)
    verdict.check()
    for r in rows:
        # A slot due as the window ended but not yet started is `skipped` by the disable (its
        # agent never ran: judged above); any other skip, or an older one, is a fault's doing.
        # "As the window ended": its due message may have gone to a node killed just before,
        # and comes back after the ack deadline (6 s), to be claimed within a lease (3 s).
        closing = (r.status == RunStatus.skipped.value and r.reason == DISABLED_REASON and r.attempt == 0
                   and r.slot >= disabled_at - timedelta(seconds=6 + 3 + 1))
        assert r.status in (RunStatus.succeeded.value, RunStatus.missed.value) or closing, (r.status, r.reason, r.error)
    ran = [r for r in rows if r.status == RunStatus.succeeded.value]
    assert len(ran) >= JOBS * 15
    assert all(r.delivery_status == DeliveryStatus.delivered.value for r in ran)
    accepted = Counter(q.idempotency_key for q in relay.accepted)
    assert set(accepted) == {r.id for r in ran}
    # Delivery is at least once (invariant 2): a dispatcher SIGKILLed between Relay's 200 and
    # recording it sends again after its claim lapses. A repeat must carry the same key and the
    # same body, so Relay's de-duplication by Idempotency-Key leaves exactly one message per run.
    bodies: dict[str, set] = {}
    for q in relay.accepted:
        bodies.setdefault(q.idempotency_key, set()).add(repr(q.json))
    assert all(len(b) == 1 for b in bodies.values())
    assert sum(n - 1 for n in accepted.values()) <= 2 * JOBS  # only runs in flight at a kill
    # No deposed leader wrote a slot: in the order slots were written, terms only go up.
    revs = [r.leader_rev for r in rows if r.leader_rev]
    assert revs == sorted(revs)
    assert len(set(revs)) >= 3
