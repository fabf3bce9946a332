"""A kjob node: the chosen roles over NATS and one database engine.

Each role connects with its own URL from `nats_urls` when given (`kjob up`: its own NATS user,
so each is held to its role's permissions), else with `nats_url`; roles with the same URL share
one connection.

`kjob up` runs every role on embedded servers; `kjob server --roles ...` runs some of them
against external NATS and PostgreSQL. Roles share nothing but the bus and the ledger, so any
node may run any of them (only the ticker is a singleton, by election).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import uvicorn

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob._tasks import cancel_and_wait
from kjob.bus import presence
from kjob.bus.errors import BUS_ERRORS
from kjob.bus.publish import announce_job_changed, announce_jobs_changed, publish_due
from kjob.bus.setup import BusSettings, connect, ensure_streams
from kjob.config import ROLES, Settings
from kjob.embedded._process import die_with_parent
from kjob.errors import InvalidInput, ServerError
from kjob.executor.agents import AgentRegistry
from kjob.executor.sandbox import Sandbox
from kjob.model.job import Job
from kjob.model.run import Run
from kjob.store.database import create_engine, migrate
from kjob.store.jobs import JobStore
from kjob.store.claims import ClaimLedger
from kjob.store.deliveries import DeliveryLedger
from kjob.store.runs import RunReads
from kjob.store.slots import SlotLedger
from kjob.store.tokens import TokenStore
from kjob.telemetry import metrics
from kjob.telemetry.logging import attach_output_file
from kjob.ticker.leader import Leadership

log = logging.getLogger(__name__)


def parse_roles(text: str) -> frozenset[str]:
    roles = frozenset(r.strip() for r in text.split(",") if r.strip())
    unknown = roles - set(ROLES)
    if not roles or unknown:
        raise InvalidInput(f"unknown role(s) {sorted(unknown) or text!r}; choose from {', '.join(ROLES)}", "roles")
    return roles


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (the node owns SIGINT/SIGTERM), saying when it
    listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    def capture_signals(self):  # type: ignore[override]
        return contextlib.nullcontext()

    async def startup(self, sockets=None) -> None:  # type: ignore[override]
        await super().startup(sockets)
        if self.started:
            self.listening.set()


@dataclass
class _Wiring:
    """What the roles of a running node share: the engine, the bus (`bus_of(role)`: the role's
    connection and its JetStream), the stores, and where each started role leaves its task and
    what must be closed after it stopped."""

    engine: AsyncEngine
    bus_of: Callable[[str], tuple[NATS, JetStreamContext]]
    bus: BusSettings
    jobs: JobStore
    slots: SlotLedger
    agents: AgentRegistry
    tasks: dict[str, asyncio.Task]
    closers: contextlib.AsyncExitStack
    stop: asyncio.Event


@dataclass
class Node:
    settings: Settings
    roles: frozenset[str]
    nats_url: str
    database_url: str
    #: role -> NATS URL (its user's credentials); a role not in it uses `nats_url`.
    nats_urls: dict[str, str] = field(default_factory=dict)
    #: Set once the API listens (with its URL) or, without the api role, once roles started.
    on_ready: Callable[[str | None], Awaitable[None] | None] | None = None
    name: str = field(default_factory=socket.gethostname)
    api_url: str | None = None
    #: Filled while starting: the sandboxes this node offers, those that failed and why.
    sandboxes: dict[str, Sandbox] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    leadership: Leadership | None = None
    #: Where run-now and backfill publish (`publish_due`): the api role's bus when it runs here.
    _js: JetStreamContext | None = field(default=None, init=False, repr=False)
    _slots: SlotLedger | None = field(default=None, init=False, repr=False)

    async def run(self, stop: asyncio.Event) -> None:
        """Start the roles, run until `stop` or until one fails, then stop them all and close
        what they used, in the reverse order (also when start-up failed half-way: no role may
        outlive the node)."""
        s = self.settings
        self.name = s.node_name or self.name
        tasks: dict[str, asyncio.Task] = {}
        async with contextlib.AsyncExitStack() as stack:
            engine = create_engine(self.database_url, statement_timeout_s=s.database.statement_timeout_s,
                                   connect_timeout_s=s.database.connect_timeout_s,
                                   pool_timeout_s=s.database.pool_timeout_s)
            stack.push_async_callback(engine.dispose)
            await migrate(self.database_url)  # without the statement deadline: an index build may take minutes
            bus_of = await self._connect(stack)
            closers = await stack.enter_async_context(contextlib.AsyncExitStack())
            stack.push_async_callback(_stop_all, tasks, stop)  # first on the way out
            _, js = bus_of(min(self.roles))  # any role may declare the streams and announce the node
            await ensure_streams(js, s.stream_replicas)
            w = _Wiring(engine=engine, bus_of=bus_of, bus=BusSettings(replicas=s.stream_replicas, ack_wait_s=s.ack_wait_s),
                        jobs=JobStore(engine, void_ahead=s.ticker.lookahead_ms > 0), slots=SlotLedger(engine),
                        agents=AgentRegistry.load(s.executor.agents_file), tasks=tasks, closers=closers, stop=stop)
            self._js, self._slots = js, w.slots
            if "ticker" in self.roles:
                self._start_ticker(w)
            if "executor" in self.roles:
                await self._start_executor(w)
            if "dispatcher" in self.roles:
                await self._start_dispatcher(w)
            self._start_metrics(w)
            server = await self._start_api(w) if "api" in self.roles else None
            if s.dbus.enabled:  # docs/dbus.md
                from kjob import dbus

                # It only reads events: the observer user where each role logs in as itself.
                events_url = self.nats_urls.get("observer", self.nats_url)
                tasks["dbus"] = asyncio.create_task((await dbus.start(s, events_url, self.api_url)).run(stop))
            tasks["presence"] = asyncio.create_task(
                presence.announce(js, self.name, self._facts, stop, s.stream_replicas))
            if self.on_ready is not None:
                result = self.on_ready(self.api_url)
                if asyncio.iscoroutine(result):
                    await result
            await self._supervise(tasks, stop, server)

    async def _connect(self, stack: contextlib.AsyncExitStack) -> Callable[[str], tuple[NATS, JetStreamContext]]:
        """One connection per distinct NATS URL of the roles (each role's user, or the node's)."""
        connections: dict[str, NATS] = {}
        for url in sorted({self.nats_urls.get(role, self.nats_url) for role in self.roles}):
            connections[url] = await connect(url, name=f"kjob-{self.name}")
            stack.push_async_callback(_drain, connections[url])

        def bus_of(role: str) -> tuple[NATS, JetStreamContext]:
            conn = connections[self.nats_urls.get(role, self.nats_url)]
            return conn, conn.jetstream()

        return bus_of

    def _start_ticker(self, w: _Wiring) -> None:
        from kjob.store.retention import prune_forever
        from kjob.ticker.role import lead_and_tick
        from kjob.ticker.ticker import Ticker

        s = self.settings
        nc, js = w.bus_of("ticker")
        leadership = Leadership(js, self.name, ttl_s=s.ticker.lease_ttl_s, renew_s=s.ticker.lease_renew_s,
                                replicas=s.stream_replicas)
        self.leadership = leadership
        w.tasks["ticker"] = asyncio.create_task(lead_and_tick(
            leadership=leadership, ledger=w.slots, stop=w.stop,
            make_ticker=lambda: Ticker(nc=nc, js=js, jobs=w.jobs, ledger=w.slots, settings=s.ticker,
                                       leadership=leadership),
        ))
        # Every ticker node takes turns (an advisory lock), leader or not.
        w.tasks["retention"] = asyncio.create_task(prune_forever(w.engine, w.stop, s.history_prune_s))

    async def _start_executor(self, w: _Wiring) -> None:
        from kjob.executor.executor import Executor
        from kjob.executor.sandbox import make_sandboxes
        from kjob.executor.secrets import secret_resolver
        from kjob.store.quotas import Quotas

        s = self.settings
        nc, js = w.bus_of("executor")
        for backend, sandbox in make_sandboxes(s).items():
            try:
                await sandbox.start()
            except ServerError as err:
                # One missing backend (no Docker engine on a laptop) must not stop the node:
                # its runs end as `error` saying why, the others run.
                log.warning("executor: sandbox backend %r unavailable on %s: %s", backend, self.name, err)
                self.unavailable[backend] = str(err)
                continue
            self.sandboxes[backend] = sandbox
            w.closers.push_async_callback(sandbox.close)
        own, *others = concurrency_shares(s.executor.concurrency, s.executor.processes)
        executor = Executor(nc=nc, js=js, ledger=ClaimLedger(w.engine), agents=w.agents, sandboxes=self.sandboxes,
                            settings=s.executor.model_copy(update={"concurrency": own}), bus=w.bus,
                            work_root=s.work_dir, node=self.name, unavailable=self.unavailable,
                            secrets=secret_resolver(w.engine, s), quotas=Quotas(s.quotas))
        for index, share in enumerate(others, 1):
            w.tasks[f"executor.{index}"] = asyncio.create_task(self._executor_process(index, share, w.stop))
        w.closers.push_async_callback(metrics.watch_executor(self.name, lambda: executor.in_flight, own))
        if s.executor.output_log is not None:
            w.closers.push_async_callback(attach_output_file(s.executor.output_log, self.name))
        w.tasks["executor"] = asyncio.create_task(executor.run(w.stop))

    async def _start_dispatcher(self, w: _Wiring) -> None:
        from kjob.dispatcher.dispatcher import Dispatcher
        from kjob.dispatcher.relay import RelayClient

        s = self.settings
        nc, js = w.bus_of("dispatcher")
        relay = RelayClient(s.relay_url, s.relay_token, s.dispatcher.timeout_s, s.dispatcher.allow_list())
        w.closers.push_async_callback(relay.aclose)
        dispatcher = Dispatcher(nc=nc, js=js, ledger=DeliveryLedger(w.engine), relay=relay, settings=s.dispatcher,
                                bus=w.bus, log_url_base=s.public_url or self._own_api_url(), node=self.name)
        w.tasks["dispatcher"] = asyncio.create_task(dispatcher.run(w.stop))

    def _start_metrics(self, w: _Wiring) -> None:
        s = self.settings
        metrics.usage_by_job = s.metrics_usage_by_job
        for role in sorted(self.roles & metrics.CONSUMERS.keys()):  # each reads its own consumer
            w.tasks[f"metrics-{role}"] = asyncio.create_task(
                metrics.poll_consumers(w.bus_of(role)[1], {role}, w.stop, s.metrics_poll_s))

    async def _start_api(self, w: _Wiring) -> _Server:
        """The HTTP gateway, once it listens (`api_url` then says where)."""
        from kjob.gateway.app import create_app
        from kjob.gateway.state import GatewayState

        s = self.settings
        _, js = w.bus_of("api")
        self._js = js

        async def job_changed(job: Job | None, tenant: str, slug: str, kind: str) -> None:
            await announce_job_changed(js, tenant, job.id if job is not None else None, slug, kind)

        async def jobs_changed(tenant: str, changed: list) -> None:
            await announce_jobs_changed(js, tenant, [job.id for job, _ in changed], "applied")

        state = GatewayState(settings=s, engine=w.engine, jobs=w.jobs, tokens=TokenStore(w.engine), agents=w.agents,
                             relay_configured=bool(s.relay_url), on_job_changed=job_changed,
                             on_jobs_changed_hook=jobs_changed, runs=RunReads(w.engine), slots=w.slots,
                             publish_due=self.publish_due, js=js)
        # log_config=None: uvicorn's lines go through kjob's logging (JSON when asked).
        server = _Server(uvicorn.Config(create_app(state), host=s.host, port=s.port,
                                        log_level="warning", lifespan="off", log_config=None))
        serving = w.tasks["api"] = asyncio.create_task(server.serve())
        listening = asyncio.create_task(server.listening.wait())
        await asyncio.wait({serving, listening}, return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        if serving.done():
            serving.result()  # raises why it could not listen
            raise ServerError(f"the API stopped before it listened on {s.host}:{s.port}")
        port = server.servers[0].sockets[0].getsockname()[1]
        self.api_url = f"http://{_display_host(s.host)}:{port}"
        return server

    def _facts(self) -> dict:
        """What `kjob status` shows of this node (bus/presence.py)."""
        return {
            "roles": sorted(self.roles),
            "api_url": self.api_url,
            "sandboxes": {name: sb.status() for name, sb in self.sandboxes.items()},
            "sandboxes_unavailable": self.unavailable,
            "leading": bool(self.leadership and self.leadership.valid()),
        }

    async def publish_due(self, run: Run) -> None:
        """Publish a run the ledger already holds (run-now, backfill); the ticker's recovery
        re-publishes it if this fails."""
        assert self._js is not None and self._slots is not None, "publish_due before the node started"
        await publish_due(self._js, run)
        await self._slots.mark_published([run.id])

    async def _executor_process(self, index: int, concurrency: int, stop: asyncio.Event) -> None:
        """One more executor of this node in a process of its own (`executor.processes`): the
        event loop of one process is one core. It runs as `<node>.<index>` (claims name their
        owner) with this node's settings, dies with this process (SIGKILL: as its node would),
        and is stopped with it; should it end by itself, the node fails, as for any role."""
        s = self.settings
        # KJOB_CONFIG stays: the sandbox hides the config file it names from agents.
        env = {k: v for k, v in os.environ.items() if not k.startswith("KJOB_") or k == "KJOB_CONFIG"}
        env.update(settings_env(s.model_copy(update={
            "executor": s.executor.model_copy(update={"processes": 1, "concurrency": concurrency}),
            "dbus": s.dbus.model_copy(update={"enabled": False}),  # the node's own offers it
            "node_name": f"{self.name}.{index}",
            "nats_url": self.nats_urls.get("executor", self.nats_url),
            "database_url": self.database_url,
        })))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from kjob.cli.main import main; main()", "server", "--roles", "executor",
            env=env, preexec_fn=die_with_parent(signal.SIGKILL, os.getpid()))
        try:
            await asyncio.wait({asyncio.create_task(proc.wait()), asyncio.create_task(stop.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if proc.returncode is not None and not stop.is_set():
                raise RuntimeError(f"executor process {self.name}.{index} exited with {proc.returncode}")
        finally:
            if proc.returncode is None:
                proc.terminate()  # it stops its attempts and drains, as this node does
                try:
                    await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=30)
                except (TimeoutError, asyncio.CancelledError):
                    proc.kill()
                    await proc.wait()

    def _own_api_url(self) -> str:
        return self.api_url or f"http://{_display_host(self.settings.host)}:{self.settings.port}"

    async def _supervise(self, tasks: dict[str, asyncio.Task], stop: asyncio.Event, server) -> None:
        """Run until `stop`, or until a role fails: a node with a dead role must not look alive."""
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stopper, *tasks.values()}, return_when=asyncio.FIRST_COMPLETED)
        failed = [(role, t) for role, t in tasks.items() if t in done and not t.cancelled() and t.exception()]
        stop.set()
        if server is not None:
            server.should_exit = True
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        stopper.cancel()
        if failed:
            role, task = failed[0]
            raise RuntimeError(f"the {role} role failed: {task.exception()}") from task.exception()


def concurrency_shares(concurrency: int, processes: int) -> list[int]:
    """`concurrency` runs in flight split over `processes` executor processes, each at least one."""
    base, extra = divmod(concurrency, processes)
    return [max(1, base + (1 if i < extra else 0)) for i in range(processes)]


def settings_env(settings: Settings) -> dict[str, str]:
    """`settings` as the KJOB_* environment that makes the same Settings in another process
    (sections as JSON): it takes precedence over the TOML file there."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        env[f"KJOB_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


async def _stop_all(tasks: dict[str, asyncio.Task], stop: asyncio.Event) -> None:
    stop.set()
    await cancel_and_wait(*tasks.values())


async def _drain(conn: NATS) -> None:
    try:
        await conn.drain()
    except BUS_ERRORS as err:  # NATS already away: nothing left to flush
        log.warning("could not drain the NATS connection (%r)", err)


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host
