"""The ticker role of a node: campaign for the lease, tick while leading, stand by otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable

from kjob.store.runs import RunLedger
from kjob.telemetry import metrics
from kjob.ticker.leader import Leadership
from kjob.ticker.ticker import Ticker

log = logging.getLogger(__name__)


async def lead_and_tick(
    *, leadership: Leadership, ledger: RunLedger, make_ticker: Callable[[], Ticker], stop: asyncio.Event
) -> None:
    """One term after another until `stop`: each term loads its jobs afresh from the store and
    the ledger, so a new leader continues exactly where the ledger says the last one stopped."""
    while not stop.is_set():
        if not await leadership.campaign(stop):
            return
        term = asyncio.Event()
        holder = asyncio.create_task(leadership.hold(stop))
        holder.add_done_callback(lambda _: term.set())
        try:
            if await _fence(leadership, ledger, holder):
                await make_ticker().run(term)
        finally:
            term.set()
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder
        if stop.is_set():
            await leadership.resign()
            return
        metrics.leader_changed(leadership.node, False)
        log.info("ticker: %s is a standby now", leadership.node)


async def _fence(leadership: Leadership, ledger: RunLedger, holder: asyncio.Task) -> bool:
    """Write the new revision into the ledger's fence, retrying while the lease holds."""
    delay = 0.2
    while not holder.done():
        revision = leadership.term
        if revision is None:
            return False
        try:
            if await ledger.take_lease(revision, leadership.node, stale_after_s=60.0):
                return True
            log.warning("ticker: the ledger fence holds a newer revision than %d; standing by", revision)
            return False
        except Exception as err:
            log.warning("ticker: cannot write the ledger fence (%s); retrying", err)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    return False
