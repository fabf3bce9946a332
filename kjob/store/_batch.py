"""Calls of one statement gathered into one round trip, as a database's group commit does.

A call made while fewer than `in_flight` batches are in the database goes at once, from the
caller's own task (a hop through another task costs a turn of a busy event loop each way): a
quiet node waits for nothing. Calls made while that many are out wait for one to come back,
and go together in the next. So a herd of 100 claims at one instant costs a few round trips and
transactions, not 100 statements fighting for the same two cores, and the batches grow only as
the load does. One batch out at a time by default: at two or four, most calls of a 2-core node
at 100 runs/s went alone, and the node spent 9.0 - 9.2 ms of CPU a run against 7.1 - 7.6 at one
(bench/fastpath.py, 2026-12-03). The price: a batch that waits on one run's lock (its job's lock
held by a slow transaction) holds up the calls behind it while it waits.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


class BatchInterrupted(ConnectionError):
    """The batch this call went in was cut short (the caller that sent it was cancelled, as a
    stopping node cancels its work): whether it took effect is unknown, as for a lost connection."""


class Batched(Generic[K, R]):
    """`await batched(key, item)`: the result for `key` of `run({key: item, ...})`, which
    answers a batch of distinct keys at once (a dict; a key it leaves out gets `missing`, an
    exception as its value is raised to that caller alone). An exception of `run` is every
    caller's of that batch. A key asked twice at once goes in two batches (the database orders
    them: a run claimed twice is claimed once)."""

    def __init__(self, run: Callable[[dict[K, Any]], Awaitable[dict[K, R | Exception]]], *, missing: R,
                 max_size: int = 64, in_flight: int = 1) -> None:
        self._run, self._missing, self._max_size, self._in_flight = run, missing, max_size, in_flight
        self._queue: list[tuple[K, Any, asyncio.Future[R]]] = []
        self._out = 0  #: batches in the database now
        self._drainer: asyncio.Task | None = None

    async def __call__(self, key: K, item: Any = None) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((key, item, future))
        if self._out < self._in_flight:
            await self._send()  # this call's own batch, with whatever waited; the rest queue after it
        # Cancelling a caller does not take its key out of a batch in the database: what the
        # statement does to it stands (a run claimed for a caller gone lapses, as it would have).
        return await future

    def _drain_later(self) -> None:
        """What queued while the batches were out goes next, from a task of its own."""
        if self._queue and self._out < self._in_flight and (self._drainer is None or self._drainer.done()):
            self._drainer = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while self._queue and self._out < self._in_flight:
            await self._send()

    def _take(self) -> tuple[dict[K, asyncio.Future[R]], dict[K, Any]]:
        batch: dict[K, asyncio.Future[R]] = {}
        items: dict[K, Any] = {}
        later: list[tuple[K, Any, asyncio.Future[R]]] = []
        for key, item, future in self._queue:
            if future.done():
                continue  # its caller was cancelled before the batch went
            if key in batch or len(batch) >= self._max_size:
                later.append((key, item, future))
            else:
                batch[key], items[key] = future, item
        self._queue = later
        return batch, items

    async def _send(self) -> None:
        batch, items = self._take()
        if not batch:
            return
        self._out += 1
        try:
            results = await self._run(items)
        except Exception as err:
            for future in batch.values():
                if not future.done():
                    future.set_exception(err)
            return
        except BaseException:  # the task sending it was cancelled: the others learn it was cut short
            for future in batch.values():
                if not future.done():
                    future.set_exception(BatchInterrupted("the batch this call went in was interrupted"))
            raise
        finally:
            self._out -= 1
            self._drain_later()
        for key, future in batch.items():
            if not future.done():
                result = results.get(key, self._missing)
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
