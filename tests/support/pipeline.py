"""Run a real kjob node (ticker, executor, dispatcher, API) inside the test's event loop."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx
from sqlalchemy import select

from kjob.config import ROLES, DispatcherSettings, ExecutorSettings, Settings, TickerSettings
from kjob.model.job import Job, parse_job
from kjob.model.run import Run
from kjob.node import Node
from kjob.store.audit import Actor
from kjob.store.jobs import JobStore
from kjob.store.runs import RunReads
from kjob.store.tables import job_runs, run_attempts
from kjob.store.tokens import TokenStore

ACTOR = Actor(subject="test", token_id=None, tenant="default")


def fast_settings(home: Path, **overrides: Any) -> Settings:
    """Short leases and backoffs so failure paths finish in seconds, not minutes."""
    base: dict[str, Any] = dict(
        home=home,
        port=0,
        ack_wait_s=4.0,
        ticker=TickerSettings(resync_s=30.0, recover_s=1.0),
        executor=ExecutorSettings(heartbeat_s=0.5, claim_lease_s=2.0, concurrency=8),
        dispatcher=DispatcherSettings(retry_initial_s=0.5, retry_max_s=2.0, timeout_s=2.0),
    )
    base.update(overrides)
    return Settings(**base)


async def until(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds saying `what`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


@asynccontextmanager
async def running_node(settings: Settings, nats_url: str, database_url: str,
                       roles: frozenset[str] = frozenset(ROLES)) -> AsyncIterator[Node]:
    stop = asyncio.Event()
    ready = asyncio.Event()
    node = Node(settings=settings, roles=roles, nats_url=nats_url, database_url=database_url,
                on_ready=lambda url: ready.set())
    task = asyncio.create_task(node.run(stop))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # the node failed to start: raise why
    assert ready.is_set(), "node did not become ready within 30s"
    try:
        yield node
    finally:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=30)
        except TimeoutError:
            stuck = "\n".join(_where(t) for t in asyncio.all_tasks() if not t.done())
            task.cancel()
            raise AssertionError(f"the node did not stop within 30 s; tasks still running:\n{stuck}") from None


def _where(task: asyncio.Task) -> str:
    """Where a task waits, down its chain of awaits (a task's own stack shows only its top)."""
    coro, frames = task.get_coro(), []
    while coro is not None and getattr(coro, "cr_frame", None) is not None:
        frames.append(f"{coro.cr_code.co_name}:{coro.cr_frame.f_lineno}")
        coro = coro.cr_await
    return f"{task.get_name()}: " + " > ".join(frames)


async def create_job(engine, **fields: Any) -> Job:
    spec = {"agent": "shell", "schedule": "@every 1s", "timeout": "30s", **fields}
    return await JobStore(engine).create(ACTOR, parse_job(spec))


async def runs_of(engine, job: Job) -> list[Run]:
    return sorted(await RunReads(engine).list_for_job(job.id, limit=10_000), key=lambda r: r.slot)


async def run_to_end(node: Node, engine, job: Job, timeout: float = 20) -> Run:
    """Run `job` once now (a manual run, published to the node) and wait for its end."""
    from kjob.store.slots import SlotLedger

    run = await SlotLedger(engine).create_manual(job)
    await node.publish_due(run)

    async def final():
        ended = await RunReads(engine).get(job.tenant, run.id)
        return ended.status.final and ended
    return await until(final, timeout, f"run {run.id} of {job.slug} to end")


async def attempts_of(engine, run_id: str) -> list:
    return await RunReads(engine).attempts(run_id)


async def attempt_rows(engine, job: Job) -> list:
    async with engine.connect() as conn:
        return list(await conn.execute(
            select(run_attempts).join(job_runs, job_runs.c.id == run_attempts.c.run_id)
            .where(job_runs.c.job_id == job.id)
        ))


@asynccontextmanager
async def node_clients(engine, default_role: str, label: str) -> AsyncIterator[Callable[..., Awaitable[httpx.AsyncClient]]]:
    """`await make(node, role=..., tenant="default")`: an HTTP client of the node's API holding
    a fresh token of that role and tenant; every client is closed at the end."""
    clients: list[httpx.AsyncClient] = []

    async def make(node: Node, role: str = default_role, tenant: str = "default") -> httpx.AsyncClient:
        _, secret = await TokenStore(engine).create(tenant, role, f"{label} {role}")
        client = httpx.AsyncClient(base_url=node.api_url, headers={"Authorization": f"Bearer {secret}"}, timeout=30)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            await client.aclose()
