"""The ticker role of a node: campaign for the lease, tick while leading, stand by otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from kjob.store.slots import SlotLedger
from kjob.telemetry import metrics
from kjob.ticker.leader import Leadership
from kjob.ticker.ticker import TermOver, Ticker
from kjob._tasks import stopped_within

log = logging.getLogger(__name__)


async def lead_and_tick(
    *, leadership: Leadership, ledger: SlotLedger, make_ticker: Callable[[], Ticker], stop: asyncio.Event
) -> None:
    """One term after another until `stop`: each term loads its jobs afresh from the store and
    the ledger, so a new leader continues exactly where the ledger says the last one stopped."""
    backoff = _Backoff()
    while not stop.is_set():
        if not await leadership.campaign(stop):
            return
        revision = leadership.term
        term = asyncio.Event()
        holder = asyncio.create_task(leadership.hold(stop))
        holder.add_done_callback(lambda _: term.set())
        refused = False
        try:
            if await _fence(leadership, ledger, holder):
                ticker = make_ticker()
                await ticker.run(term)
                refused = ticker.ended is not None and not isinstance(ticker.ended, TermOver)
            else:
                refused = leadership.term is not None  # the fence said no while the lease held
        finally:
            term.set()
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder
        if stop.is_set():
            await _withdraw_ahead(ledger, revision)
            await leadership.resign()
            return
        metrics.leader_changed(leadership.node, False)
        if refused:
            # The ledger refused this node (a newer fence) or could not be reached: give the
            # lease up for another node, and wait before campaigning again, longer each time,
            # rather than win the lease back at once and be refused in a hot loop.
            await leadership.resign()
            delay = backoff.next()
            log.warning("ticker: %s stands by for %.1fs before campaigning again", leadership.node, delay)
            await stopped_within(stop, delay)
        else:
            backoff.reset()
        log.info("ticker: %s is a standby now", leadership.node)


async def _withdraw_ahead(ledger: SlotLedger, revision: int | None, timeout_s: float = 2.0) -> None:
    """On a stop, before the lease is given up: the slots this term queued ahead of their
    instant go back, so the next leader fires them, or settles them as downtime, instead of
    their running late when this node comes back. A stop never waits long on it: left in
    place, they still run (late)."""
    if revision is None:
        return
    try:
        async with asyncio.timeout(timeout_s):
            withdrawn = await ledger.withdraw_ahead(revision)
    except Exception as err:
        log.warning("ticker: the slots queued ahead were not withdrawn (%s); they will run when an executor "
                    "gets them", err)
        return
    if withdrawn:
        log.info("ticker: withdrew %d slots queued ahead of their instant", withdrawn)


class _Backoff:
    """1 s, 2 s, 4 s ... up to 30 s between refused terms; reset by a term that ends normally."""

    def __init__(self, first_s: float = 1.0, max_s: float = 30.0) -> None:
        self.first_s, self.max_s, self._next = first_s, max_s, first_s

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self._next = self.first_s


async def _fence(leadership: Leadership, ledger: SlotLedger, holder: asyncio.Task) -> bool:
    """Write the new revision into the ledger's fence, retrying (0.2 s, doubling to 2 s) while
    the lease holds."""

    async def take() -> bool:
        revision = leadership.term
        if holder.done() or revision is None:
            return False
        if await ledger.take_lease(revision, leadership.node, stale_after_s=60.0):
            return True
        log.warning("ticker: the ledger fence holds a newer revision than %d; standing by", revision)
        return False

    def waiting(state: RetryCallState) -> None:
        log.warning("ticker: cannot write the ledger fence (%s); retrying", state.outcome.exception())

    retrying = AsyncRetrying(retry=retry_if_exception_type(Exception), wait=wait_exponential(multiplier=0.2, max=2.0),
                             before_sleep=waiting)
    return await retrying(take)
