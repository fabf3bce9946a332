"""The pull loop executors and dispatchers share: fetch no more messages than there are free
handler slots (a fetched message waiting for a slot would age towards its ack deadline), run
each handler as a task, and on stop cancel the handlers in flight.

A message that came early (the ticker's look-ahead, kjob.bus.hold) gives its slot back while it
waits for its instant, so a look-ahead of any length never starves the runs due now: up to
MAX_HELD messages wait so, their ack deadlines kept by `in_progress` until their handler starts.
On stop, a message whose handler has not started is given back (kjob.bus.ack.give_back): it is
redelivered at once, not after its ack deadline, and a stopping node starts nothing new.""" 

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable

from nats.js.errors import FetchTimeoutError

from kjob._tasks import cancel_and_wait
from kjob.bus import ack
from kjob.bus.errors import BUS_ERRORS

log = logging.getLogger(__name__)

FETCH_WAIT_S = 1.0
#: Early messages one consumer holds outside its slots (a herd of 10,000 on one second fits);
#: beyond it an early message waits in its slot. The consumer's max_ack_pending bounds them too.
MAX_HELD = 10_000


async def consume(sub, handle: Callable[[object], Awaitable[None]], *, concurrency: int, stop: asyncio.Event,
                  name: str, hold: Callable[[object], float] | None = None, keepalive_s: float = 10.0) -> None:
    """Run `handle(msg)` for every message of the pull subscription, at most `concurrency` at
    once, until `stop`. A handler that raises is logged; its message is left to redelivery.
    `hold(msg)`: seconds the message is to wait before its handler (0: none)."""
    free = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task] = set()
    held = 0

    async def run(msg) -> None:
        nonlocal held
        owns_slot = True
        try:
            wait = hold(msg) if hold is not None else 0.0
            if wait > 0:
                alive = asyncio.create_task(_keep_alive(msg, keepalive_s))
                try:
                    if held < MAX_HELD:
                        free.release()
                        owns_slot, held = False, held + 1
                        try:
                            await asyncio.sleep(wait)
                        finally:
                            held -= 1
                        await free.acquire()
                        owns_slot = True
                    else:
                        await asyncio.sleep(wait)
                except asyncio.CancelledError:
                    await asyncio.shield(ack.give_back(msg))
                    raise
                finally:
                    await cancel_and_wait(alive)
            if stop.is_set():  # stopping: what has not started here is another's to start
                await ack.give_back(msg)
                return
            await handle(msg)
        finally:
            if owns_slot:
                free.release()

    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
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
                task = asyncio.create_task(run(msg))
                tasks.add(task)
                task.add_done_callback(done)
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _keep_alive(msg, every_s: float) -> None:
    """Push the message's ack deadline out every `every_s` while it waits for its handler."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await msg.in_progress()
        except BUS_ERRORS as err:  # NATS away: the message may come again, and the claim decides
            log.debug("in_progress of a held message failed (%s)", err)
