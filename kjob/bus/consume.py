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
import heapq
import itertools
import logging
from typing import Awaitable, Callable

from nats.js.errors import FetchTimeoutError

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
    loop = asyncio.get_running_loop()
    free = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task] = set()
    #: Early messages by instant (loop time). One releaser starts them as slots free up, so a
    #: herd's first run starts at the instant instead of after 10,000 timers have fired.
    held: list[tuple[float, int, object]] = []
    order = itertools.count()
    added = asyncio.Event()

    async def run(msg, wait: float = 0.0) -> None:
        try:
            if wait > 0:  # more held than MAX_HELD: this one waits in its slot
                await asyncio.sleep(wait)
            if stop.is_set():  # stopping: what has not started here is another's to start
                await ack.give_back(msg)
                return
            await handle(msg)
        finally:
            free.release()

    def start(msg, wait: float = 0.0) -> None:  # holding a slot of `free`
        task = asyncio.create_task(run(msg, wait))
        tasks.add(task)
        task.add_done_callback(done)

    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: handler crashed", name, exc_info=task.exception())

    async def release_held() -> None:
        while True:
            if not held or held[0][0] > loop.time():
                added.clear()
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the cancellation
                # that ends this loop when `added` is set at the same moment (seen: a stop hung).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(held[0][0] - loop.time() if held else None):
                        await added.wait()
                continue
            await free.acquire()
            start(heapq.heappop(held)[2])  # only this task pops: the earliest is still due

    async def keep_held_alive() -> None:
        while True:
            await asyncio.sleep(keepalive_s)
            for _, _, msg in list(held):
                await _in_progress(msg)

    helpers = [asyncio.create_task(release_held()), asyncio.create_task(keep_held_alive())]
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
            in_hand = True  # the slot acquired above
            for msg in msgs:
                wait = hold(msg) if hold is not None else 0.0
                if wait > 0 and len(held) < MAX_HELD:
                    heapq.heappush(held, (loop.time() + wait, next(order), msg))
                    added.set()
                    continue
                if not in_hand:
                    await free.acquire()
                in_hand = False
                start(msg, wait)
            if in_hand:
                free.release()
    finally:
        for task in [*helpers, *tasks]:
            task.cancel()
        await asyncio.gather(*helpers, *tasks, return_exceptions=True)
        # Held, never started: given back, to be redelivered at once rather than at their ack deadline.
        await asyncio.gather(*(ack.give_back(msg) for _, _, msg in held))
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _in_progress(msg) -> None:
    """Push a held message's ack deadline out."""
    try:
        await msg.in_progress()
    except BUS_ERRORS as err:  # NATS away: the message may come again, and the claim decides
        log.debug("in_progress of a held message failed (%s)", err)
