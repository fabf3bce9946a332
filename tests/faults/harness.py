"""The fault suite's world: a PostgreSQL of its own (to pause, restart and cut off), NATS, two
`kjob server` nodes, a recorder the agents report to, and every-second jobs. `verdict()` then
holds the ledger against what the agents themselves reported, slot by slot."""

from __future__ import annotations

import asyncio
import os
import time
import signal
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import AsyncIterator, Callable

from sqlalchemy import select, text

from kjob.bus.publish import announce_job_changed
from kjob.bus.setup import connect
from kjob.embedded import EmbeddedPostgres
from kjob.model.job import Job
from kjob.model.run import RunStatus
from kjob.store.database import create_engine, migrate
from kjob.store.jobs import JobStore
from kjob.store.tables import job_runs, run_attempts, ticker_lease
from tests.support.nodes import SchedulerProcess
from tests.support.pipeline import ACTOR, create_job, until
from tests.support.recorder import Execution, Recorder
from tests.support.tcpproxy import TcpProxy

#: Short leases and heartbeats, so that each fault plays out in seconds. The claim lease is
#: what a stall must outlast to matter; the statement deadline is well inside it.
FAST_ENV = {
    # Shorter than a stall: a message whose ack deadline waited on the database would be
    # redelivered during it (it must not be: the ack deadline is renewed apart from the database).
    "KJOB_ACK_WAIT_S": "4",
    "KJOB_EXECUTOR__HEARTBEAT_S": "0.5",
    "KJOB_EXECUTOR__CLAIM_LEASE_S": "6",
    "KJOB_EXECUTOR__CLAIM_MARGIN_S": "2",
    "KJOB_EXECUTOR__SANDBOXES": '["process"]',
    "KJOB_EXECUTOR__CONCURRENCY": "16",
    "KJOB_TICKER__RECOVER_S": "2",
    "KJOB_DATABASE__STATEMENT_TIMEOUT_S": "2",
    "KJOB_DATABASE__CONNECT_TIMEOUT_S": "2",
    "KJOB_DATABASE__POOL_TIMEOUT_S": "3",
    "KJOB_LOG_LEVEL": "INFO",
    # Less flapping of the ticker's leadership on a loaded machine; failover has its own tests.
    "KJOB_TICKER__LEASE_TTL_S": "3",
    "KJOB_TICKER__LEASE_RENEW_S": "0.5",
}
LEASE_S = float(FAST_ENV["KJOB_EXECUTOR__CLAIM_LEASE_S"])
#: How long before a pause or kill an agent's end may still have been on its way to the ledger.
UNRECORDED_S = 1.0
NODES = ("node-a", "node-b")
#: Final statuses a slot may end in without its agent having run, each with its reason.
NOT_RUN = {RunStatus.missed.value, RunStatus.skipped.value}


@dataclass
class Verdict:
    """What the ledger and the recorder say about every slot of the window."""

    slots: int = 0
    ran_once: int = 0
    not_run: int = 0  #: missed/skipped, with a reason
    problems: list[str] = field(default_factory=list)
    #: executions per slot: {0: n, 1: n, 2: n} (only completed executions count)
    histogram: dict[int, int] = field(default_factory=dict)
    #: runs run again because their first execution ended while its executor could not record
    #: it (the residual README names), counted apart when the caller excuses them
    reruns: int = 0

    def summary(self) -> str:
        return (f"{self.slots} slots: {self.ran_once} ran once, {self.not_run} not run (with a reason), "
                f"{self.reruns} run again after an end no executor could record; "
                f"completed executions per slot: {dict(sorted(self.histogram.items()))}")

    def check(self) -> None:
        print(self.summary())
        assert not self.problems, f"{len(self.problems)} problem(s) in {self.slots} slots:\n" + "\n".join(self.problems[:40])


class FaultCluster:
    """`nats`: an EmbeddedNats or a NatsCluster (then streams are R3)."""

    def __init__(self, base: Path, nats, *, pg: EmbeddedPostgres | None = None) -> None:
        self.base = base
        self.nats = nats
        self.nats_url = nats.url
        self.pg = pg or EmbeddedPostgres(base / "pg", durable=False, settings={"max_connections": "200"})
        self.proxy: TcpProxy | None = None
        self.recorder = Recorder()
        self.engine = None
        self.db_url = ""
        self.nodes: dict[str, SchedulerProcess] = {}
        self.jobs: list[Job] = []
        #: seconds each job's agent works, by slug (a fault strikes where no agent is about to end)
        self.durations: dict[str, float] = {}
        #: (node, from, to) on the recorder's clock: each time a node's executor could record
        #: nothing (paused by executor_sigstop; killed by executor_sigkill, from = to)
        self.pauses: list[tuple[str, float, float]] = []

    async def start(self, *, skewed: dict[str, float] | None = None, proxied: str | None = None,
                    lead_skewed: bool = False, env: dict[str, str] | None = None) -> None:
        """`skewed`: node name -> seconds its wall clock is ahead (faketime; its monotonic clock
        stays true). `proxied`: the node that reaches PostgreSQL through `self.proxy`. `env`:
        settings for both nodes."""
        if not self.pg.running:
            await asyncio.to_thread(self.pg.start)
        self.db_url = self.pg.ensure_database("faults")
        await migrate(self.db_url)
        self.engine = create_engine(self.db_url, pool_size=2)
        self.recorder.start()
        if proxied:
            self.proxy = TcpProxy(self.pg.host, self.pg.port).start()
        replicas = {"KJOB_STREAM_REPLICAS": str(len(self.nats.nodes))} if hasattr(self.nats, "nodes") else {}
        for name in NODES:
            db_url = self.db_url
            if name == proxied:
                db_url = self.db_url.replace(f":{self.pg.port}/", f":{self.proxy.port}/")
            env = {**FAST_ENV, **replicas, **self.recorder.env(), "KJOB_NATS_URL": self.nats_url, "KJOB_DATABASE_URL": db_url,
                   **(env or {})}
            if skewed and name in skewed:
                # libfaketime (Debian's faketime) preloaded into the node itself (the `faketime`
                # command would stand between us and it, and eat our signals). The wall clock
                # only: asyncio's timers (monotonic) stay true, as on a real host.
                env.update(LD_PRELOAD=_libfaketime(), FAKETIME=f"{skewed[name]:+.0f}s", FAKETIME_DONT_FAKE_MONOTONIC="1")
            self.nodes[name] = SchedulerProcess(name, self.base, env)
        # `lead_skewed`: the skewed node starts first, and leads (its ticker's recovery loop then
        # judges the others' claims by its clock). Not by default: see the report of issue 11.
        order = sorted(self.nodes, key=lambda n: n not in (skewed or {})) if lead_skewed else list(self.nodes)
        for name in order:
            self.nodes[name].start()
            if lead_skewed and name == order[0]:
                await self.leader(timeout=60)
        await self.leader(timeout=60)

    async def close(self) -> dict[str, int | None]:
        codes = {name: await asyncio.to_thread(node.stop) for name, node in self.nodes.items()}
        if self.engine is not None:
            await self.engine.dispose()
        self.recorder.close()
        if self.proxy is not None:
            self.proxy.close()
        await asyncio.to_thread(self.pg.stop)
        return codes

    # -- the workload ---------------------------------------------------------------------

    async def add_jobs(self, n: int = 3, seconds: float = 0.3, slug: str = "beat", schedule: str = "@every 1s",
                       **fields) -> list[Job]:
        # overlap "allow": a run held up by a fault must not turn later slots into `skipped`;
        # exactly-once is what is tested here, the overlap policy has its own tests.
        jobs = [await create_job(self.engine, slug=f"{slug}-{i}", prompt=self.recorder.script(seconds),
                                 schedule=schedule, overlap="allow", **fields) for i in range(n)]
        await self._announce(jobs, "created")
        self.jobs += jobs
        self.durations.update((job.slug, seconds) for job in jobs)
        return jobs

    async def _announce(self, jobs: list[Job], kind: str) -> None:
        """Tell the ticker at once (it would find out at its next resync); NATS may be recovering."""
        nc = await connect(self.nats_url, "faults-test")
        try:
            for job in jobs:
                await _retry(lambda: announce_job_changed(nc.jetstream(), job.tenant, job.id, job.slug, kind))
        finally:
            await nc.close()

    async def executions_done(self, n: int, timeout: float = 60) -> None:
        """Wait until `n` more executions ran to their end."""
        target = len(self.recorder.completed()) + n
        await until(lambda: _ready(len(self.recorder.completed()) >= target), timeout,
                    f"{n} more executions to end (nodes' logs: {self.tails()})")

    async def running_now(self, timeout: float = 30) -> list[Execution]:
        """Wait until some agent is running, and return those that are."""
        try:
            return await until(lambda: _ready(self.recorder.running()), timeout, "an agent to be running")
        except AssertionError as err:
            raise AssertionError(f"{err}\nsessions in a transaction:\n{self.activity()}\n"
                                 f"nodes' logs: {self.tails(6000)}") from None

    async def leader(self, timeout: float = 30) -> str:
        async def read():
            try:
                async with self.engine.connect() as conn:
                    row = (await conn.execute(select(ticker_lease.c.node))).first()
                return row.node if row else None
            except Exception:
                return None
        return await until(read, timeout, "a ticker leader")

    async def end_window(self, timeout: float = 90) -> None:
        """Disable the jobs, then wait until every run is final and no agent runs."""
        store = JobStore(self.engine)
        for job in self.jobs:
            await _retry(lambda: store.set_enabled(ACTOR, job.slug, False, note="end of the fault window"))
        await self._announce(self.jobs, "disabled")

        state: dict = {}

        async def settled():
            try:
                async with self.engine.connect() as conn:
                    state["open"] = (await conn.execute(text(
                        "SELECT id, slug, status, attempt, claimed_by, claim_until, now() AS now FROM job_runs "
                        "WHERE status IN ('scheduled','running','retrying') ORDER BY slot LIMIT 10"))).all()
            except Exception as err:
                state["open"] = repr(err)
                return False
            state["running"] = self.recorder.running()
            return not state["open"] and not state["running"]
        try:
            await until(settled, timeout, "every run final and no agent running")
        except AssertionError as err:
            raise AssertionError(f"{err}\nopen runs: {state.get('open')}\nagents running: {state.get('running')}"
                                 f"\nsessions in a transaction:\n{self.activity()}\nnodes' logs: {self.tails()}") from None

    async def restart(self, name: str) -> None:
        """Start a stopped node again, and wait until it runs (a SIGTERM before it installed its
        handlers would kill it outright)."""
        node = self.nodes[name]
        before = node.logs(10**7).count("kjob node running")
        node.start()
        await until(lambda: _ready(node.logs(10**7).count("kjob node running") > before), 60, f"{name} to run again")

    def clock_ahead(self, name: str) -> float:
        """How far ahead of ours the node's wall clock ran when it started: its first log line
        against the instant we started it."""
        import re
        node = self.nodes[name]
        for line in node.log_path.read_text(errors="replace").splitlines():
            found = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
            if found:
                logged = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                return logged - node.started_at
        raise AssertionError(f"{name} logged no timestamped line")

    def activity(self) -> str:
        """The database's sessions that are in a transaction: who holds what, for how long."""
        try:
            return self.pg.psql(
                "SELECT a.pid, a.client_port, a.application_name, a.state, now() - a.xact_start AS age, "
                "a.wait_event_type, a.wait_event, left(a.query, 160), (SELECT string_agg(l.locktype || ':' || "
                "coalesce(l.relation::regclass::text, '') || ':' || l.mode || ':' || l.granted, ' ') "
                "FROM pg_locks l WHERE l.pid = a.pid AND l.locktype IN ('advisory', 'relation', 'tuple') "
                "AND coalesce(l.relation::regclass::text, '') NOT LIKE 'pg_%') AS locks "
                "FROM pg_stat_activity a WHERE a.datname = 'faults' AND a.xact_start IS NOT NULL "
                "AND a.pid <> pg_backend_pid() ORDER BY a.xact_start", database="faults")
        except Exception as err:
            return repr(err)

    def tails(self, n: int = 1500) -> str:
        return " | ".join(f"{name}: ...{node.logs(n)}" for name, node in self.nodes.items())

    # -- faults ---------------------------------------------------------------------------

    def pg_pause(self) -> None:
        os.killpg(self.pg.pid, signal.SIGSTOP)  # the postmaster leads its session: all backends

    def pg_resume(self) -> None:
        os.killpg(self.pg.pid, signal.SIGCONT)

    async def pg_restart(self) -> None:
        await asyncio.to_thread(self.pg.stop)
        await asyncio.to_thread(self.pg.start)

    # -- the verdict --------------------------------------------------------------------------

    def ended_while_paused(self, e: Execution) -> bool:
        """The agent ended while its executor was paused or killed, or just before (its executor
        was still writing the end): nothing could record that end, so the run is run again once
        the claim lapsed (README, "Left"), never beside it."""
        return ended_during(self.pauses, e)

    async def verdict(self, unrecordable: "Callable[[Execution], bool] | None" = None) -> Verdict:
        """`unrecordable`: executions whose end no executor could record (they ended while their
        executor was paused); a run that ran again after one is a rerun, not a problem."""
        async with self.engine.connect() as conn:
            runs = (await conn.execute(select(job_runs).where(job_runs.c.job_id.in_([j.id for j in self.jobs]))
                                       .order_by(job_runs.c.slot))).all()
            attempts = (await conn.execute(select(run_attempts).where(
                run_attempts.c.run_id.in_([r.id for r in runs])))).all()
        return judge(self.jobs, runs, attempts, self.recorder, unrecordable)


def ended_during(outages: list[tuple[str, float, float]], e: Execution) -> bool:
    """Whether `e` ended while its node's executor was paused or killed, or just before: an
    end nothing could record (see FaultCluster.ended_while_paused)."""
    return e.ended is not None and any(e.node == node and start - UNRECORDED_S <= e.ended <= end
                                       for node, start, end in outages)


def _libfaketime() -> str:
    import glob
    found = glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")
    assert found, "libfaketime is missing: install Debian's faketime (.ci/docker.sh does)"
    return found[0]


def judge(jobs: list[Job], runs, attempts, recorder: Recorder,
          unrecordable: "Callable[[Execution], bool] | None" = None) -> Verdict:
    """For every slot: exactly one execution that ran to its end (or none, with the ledger
    saying why), no two executions of one run overlapping, and the ledger agreeing."""
    verdict = Verdict()
    executions = recorder.by_run()
    tried: dict[str, dict[int, object]] = {}
    for a in attempts:
        tried.setdefault(a.run_id, {})[a.attempt] = a
    # A report the recorder refused fails its agent (exit 97/98): say why, not only "failed".
    verdict.problems += [f"the recorder refused a report: {e}" for e in recorder.errors]
    known = {r.id for r in runs}
    for run_id, execs in executions.items():
        if run_id not in known:
            verdict.problems.append(f"agent ran for run {run_id}, which the ledger does not hold: {execs}")
    for job in jobs:
        mine = [r for r in runs if r.job_id == job.id]
        slots = [r.slot for r in mine]
        every = timedelta(seconds=float(job.schedule.split()[1].rstrip("s")))  # "@every Ns"
        holes = [(a, b) for a, b in zip(slots, slots[1:]) if b - a != every]
        if holes:
            verdict.problems.append(f"{job.slug}: slots missing from the ledger between {holes[:5]}")
        for r in mine:
            verdict.slots += 1
            execs = executions.get(r.id, [])
            done = [e for e in execs if e.finished]
            verdict.histogram[len(done)] = verdict.histogram.get(len(done), 0) + 1
            where = f"{job.slug} slot {r.slot:%H:%M:%S} run {r.id} ({r.status}, attempt {r.attempt}, {r.reason!r})"
            for a, b in _overlaps(execs):
                verdict.problems.append(f"{where}: executions overlap: attempt {a.attempt} on {a.node} "
                                        f"[{a.started:.2f}, {a.stopped(0):.2f}] and attempt {b.attempt} on {b.node} "
                                        f"[{b.started:.2f}, {b.stopped(0):.2f}]")
            if r.status == RunStatus.succeeded.value:
                if unrecordable and len(done) == 2 and unrecordable(done[0]):
                    verdict.reruns += 1
                    done = done[1:]
                if len(done) != 1:
                    ledger = "; ".join(f"{n}: {a.status} on {a.executor} ({a.reason})"
                                       for n, a in sorted(tried.get(r.id, {}).items()))
                    verdict.problems.append(f"{where}: {len(done)} executions ran to their end: "
                                            + ", ".join(f"attempt {e.attempt} on {e.node} [{e.started:.2f}, "
                                                        f"{e.stopped(0):.2f}]" for e in done)
                                            + f"; the ledger's attempts: {ledger}")
                    continue
                if done[0].attempt != r.attempt:
                    verdict.problems.append(f"{where}: the ledger's attempt {r.attempt} succeeded, "
                                            f"but the agent ran to its end in attempt {done[0].attempt}")
                verdict.ran_once += 1
            elif r.status in NOT_RUN:
                if execs:
                    verdict.problems.append(f"{where}: the ledger says it did not run, the agent ran {len(execs)}x")
                elif not r.reason:
                    verdict.problems.append(f"{where}: not run, and no reason")
                else:
                    verdict.not_run += 1
            else:
                # Ended otherwise (error after lost attempts, ...): never silently, never after a full run.
                if done:
                    verdict.problems.append(f"{where}: ended {r.status} although the agent ran to its end "
                                            f"{len(done)}x")
                elif not r.reason:
                    verdict.problems.append(f"{where}: ended {r.status} without a reason")
                else:
                    verdict.not_run += 1
            for e in execs:  # every execution the agents saw is an attempt the ledger knows
                if e.attempt not in tried.get(r.id, {}):
                    verdict.problems.append(f"{where}: the agent ran attempt {e.attempt}, the ledger has no such attempt")
    return verdict


def _overlaps(execs: list[Execution]) -> list[tuple[Execution, Execution]]:
    import time
    now = time.monotonic()
    return [(a, b) for i, a in enumerate(execs) for b in execs[i + 1:] if a.overlaps(b, now)]


async def _ready(value):
    return value


async def _retry(fn, attempts: int = 20):
    for i in range(attempts):
        try:
            return await fn()
        except Exception:
            if i == attempts - 1:
                raise
            await asyncio.sleep(0.5)


@asynccontextmanager
async def fault_cluster(base: Path, nats, **start) -> AsyncIterator[FaultCluster]:
    cluster = FaultCluster(base, nats)
    try:
        await cluster.start(**start)
        yield cluster
    finally:
        cluster.exit_codes = await cluster.close()  # type: ignore[attr-defined]


# -- the faults: each plays out while agents run, and leaves the cluster able to go on ---------

#: How long a stall or partition lasts: past every claim's lease (so the agents must be stopped
#: by their executors' own deadlines), and within the takeover grace of half a lease after it,
#: in which an owner writes the ends it kept (kjob.store.claims.ClaimLedger.claim).
#: FAULTS_STALL_S overrides it, to show what a longer stall does (README: "Left").
STALL_S = float(os.environ.get("FAULTS_STALL_S") or LEASE_S * 1.2)


async def pg_pause(c: FaultCluster) -> None:
    """PostgreSQL SIGSTOPped past the claim lease, while a 10 s agent has just started."""
    await until(lambda: _ready([e for e in c.recorder.running() if e.job and e.job.startswith("slow")
                                and time.monotonic() - e.started < 1.5]), 30, "a slow agent that just started")
    c.pg_pause()
    await asyncio.sleep(STALL_S)
    c.pg_resume()


async def pg_terminate_at_end(c: FaultCluster, seconds: float = 8.0) -> None:
    """kjob's backends terminated as agents exit (pg_terminate_backend), for `seconds`."""
    def terminate(execution: Execution) -> None:
        c.pg.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                  "WHERE datname = 'faults' AND pid <> pg_backend_pid()")
    c.recorder.on_end = terminate
    await asyncio.sleep(seconds)
    c.recorder.on_end = None


async def pg_restart(c: FaultCluster) -> None:
    await c.pg_restart()


async def pg_partition(c: FaultCluster) -> None:
    """node-a's connections to PostgreSQL black-holed past the lease (start the cluster
    with `proxied="node-a"`)."""
    assert c.proxy is not None
    c.proxy.blackhole()
    await asyncio.sleep(STALL_S)
    c.proxy.heal()


async def nats_restart(c: FaultCluster) -> None:
    servers = getattr(c.nats, "nodes", [c.nats])
    for server in servers:
        await asyncio.to_thread(server.stop)
    for server in servers:
        await asyncio.to_thread(server.launch if len(servers) > 1 else server.start)
    if len(servers) > 1:
        for server in servers:
            await asyncio.to_thread(server.wait_ready, 30)


async def nats_node_lost(c: FaultCluster) -> None:
    """One node of the R3 cluster killed; the cluster runs on two for a while; it comes back."""
    victim = c.nats.nodes[1]
    await asyncio.to_thread(victim.kill)
    await c.executions_done(4)
    await asyncio.to_thread(victim.start)


async def executor_sigkill(c: FaultCluster, strict: bool = True) -> None:
    """A node SIGKILLed while its agents are mid-run (each started less than a second ago,
    none just ended: an agent that ended a moment before its executor died may run again, as
    nothing recorded it), and restarted at once (its claims lapse all the same)."""
    def victim() -> str | None:
        now = time.monotonic()
        for name in NODES:
            mine = [e for e in c.recorder.executions() if e.node == name]
            running = [e for e in mine if not e.finished and e.died is None]
            if running and not strict:  # the bench: any moment; ends just before are excused
                return name
            # each running agent well before its end, none ended a moment ago
            if running and all(e.started + c.durations.get(e.job or "", 0.0) - now > 1.0 for e in running) and \
                    not any(e.ended and now - e.ended < 2.0 for e in mine):
                return name
        return None
    name = await until(lambda: _ready(victim()), 30, "a node whose agents all just started")
    await asyncio.to_thread(c.nodes[name].kill)
    killed = time.monotonic()
    c.pauses.append((name, killed, killed))
    await c.restart(name)


async def executor_sigstop(c: FaultCluster) -> None:
    """A node SIGSTOPped (with its ticker, if it leads) while its slow agent has just started,
    past the claim's lease and the takeover grace, so the other node claims the run again;
    then SIGCONT. The paused executor stops nothing itself: its watchdog must."""
    def victim() -> str | None:
        now = time.monotonic()
        for e in c.recorder.running():
            if e.job and e.job.startswith("slow") and now - e.started < 1.5:
                return e.node
        return None
    name = await until(lambda: _ready(victim()), 30, "a node whose slow agent just started")
    c.nodes[name].signal(signal.SIGSTOP)
    paused = time.monotonic()
    try:
        # Past the lease, the grace of half a lease, and a redelivery to the other node.
        await asyncio.sleep(LEASE_S * 1.5 + float(FAST_ENV["KJOB_ACK_WAIT_S"]) + 3)
    finally:
        c.nodes[name].signal(signal.SIGCONT)
        c.pauses.append((name, paused, time.monotonic()))


#: The faults bench/chaos.py draws from (pg_partition needs `proxied="node-a"`, pg_pause a slow job).
FAULTS = {
    "pg_pause": pg_pause,
    "pg_terminate_at_end": pg_terminate_at_end,
    "pg_restart": pg_restart,
    "pg_partition": pg_partition,
    "nats_restart": nats_restart,
    "executor_sigkill": executor_sigkill,
    "executor_sigstop": executor_sigstop,
}


async def exercise(c: FaultCluster, fault, before: int = 4, after: int = 6, slow: bool = False,
                   beats: int = 3) -> Verdict:
    """`beats` every-second jobs (and with `slow`, one whose agent works for 10 s): a few ends,
    the fault while agents run, a few more ends, then the window closes and the verdict is drawn."""
    if not c.jobs:
        if beats:
            await c.add_jobs(beats, 0.3)
        if slow:
            await c.add_jobs(1, 10, slug="slow", schedule="@every 4s")
    await c.executions_done(before)
    await c.running_now()
    await fault(c)
    await c.executions_done(after)
    await c.end_window()
    return await c.verdict()
