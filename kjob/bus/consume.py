"""The pull loop executors and dispatchers share: fetch no more messages than there are free
handler slots (a fetched message waiting for a slot would age towards its ack deadline), run
each handler as a task, and on stop cancel the handlers in flight."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable

from nats.js.errors import FetchTimeoutError

log = logging.getLogger(__name__)

FETCH_WAIT_S = 1.0


async def consume(sub, handle: Callable[[object], Awaitable[None]], *, concurrency: int, stop: asyncio.Event,
                  name: str) -> None:
    """Run `handle(msg)` for every message of the pull subscription, at most `concurrency` at
    once, until `stop`. A handler that raises is logged; its message is left to redelivery."""
    free = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task] = set()

    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
        free.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: handler crashed", name, exc_info=task.exception())

    try:
        while not stop.is_set():
            await free.acquire()
            batch = 1 + max(free._value, 0)  # noqa: SLF001 (Semaphore has no public counter)
            try:
                msgs = await sub.fetch(batch=batch, timeout=FETCH_WAIT_S)
            except (FetchTimeoutError, asyncio.TimeoutError):
                msgs = []
            except Exception as err:  # NATS reconnecting: say so, back off a little
                log.warning("%s: fetch failed (%s); retrying", name, err)
                msgs = []
                await asyncio.sleep(0.5)
            if not msgs:
                free.release()
                continue
            for i, msg in enumerate(msgs):
                if i > 0:
                    await free.acquire()
                task = asyncio.create_task(handle(msg))
                tasks.add(task)
                task.add_done_callback(done)
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
