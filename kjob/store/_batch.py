"""Calls of one statement gathered into one round trip, as a database's group commit does.

A call made while no batch is in the database goes at once, alone: a quiet node waits for
nothing. Calls made while one is in the database wait for it, and go together in the next. So a
herd of 100 claims at one instant costs two round trips and two transactions, not 100
statements fighting for the same two cores, and the batch grows only as the load does.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


class Batched(Generic[K, R]):
    """`await batched(key, item)`: the result for `key` of `run({key: item, ...})`, which
    answers a batch of distinct keys at once (a dict; a key it leaves out gets `missing`, an
    exception as its value is raised to that caller alone). An exception of `run` is every
    caller's of that batch. A key asked twice at once goes in two batches, one after the other:
    the second sees what the first did (a run claimed twice is claimed once)."""

    def __init__(self, run: Callable[[dict[K, Any]], Awaitable[dict[K, R | Exception]]], *, missing: R,
                 max_size: int = 64) -> None:
        self._run, self._missing, self._max_size = run, missing, max_size
        self._queue: list[tuple[K, Any, asyncio.Future[R]]] = []
        self._sender: asyncio.Task | None = None

    async def __call__(self, key: K, item: Any = None) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((key, item, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        # Cancelling a caller does not take its key out of a batch in the database: what the
        # statement does to it stands (a run claimed for a caller gone lapses, as it would have).
        return await future

    async def _send(self) -> None:
        while self._queue:
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
            if not batch:
                return
            try:
                results = await self._run(items)
            except Exception as err:
                for future in batch.values():
                    if not future.done():
                        future.set_exception(err)
                continue
            except BaseException:  # this task cancelled (the loop ends): so are its callers
                for future in [*batch.values(), *(f for _, _, f in self._queue)]:
                    future.cancel()
                raise
            for key, future in batch.items():
                if not future.done():
                    result = results.get(key, self._missing)
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
