"""The ticker lease (kjob.ticker.leader) on a real nats-server, two nodes in one process: a
standby takes over a lease whose renewals stopped without waiting for the server to expire
the key, never while the leader still renews, and a leader that stalled past its deadline
cannot renew over its successor. A leader leaves no watcher of the lease running."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.js.api import KeyValueConfig, StorageType

from kjob.bus import names
from kjob.bus.setup import connect
from kjob.ticker.leader import Leadership

TTL_S, RENEW_S = 1.0, 0.25


async def _bucket_expiring_after(js, seconds: float) -> None:
    """The lease bucket, made beforehand with a TTL of its own: the server expires the key
    `seconds` after the last write, whatever TTL the nodes use."""
    await js.create_key_value(KeyValueConfig(bucket=names.LEADER_BUCKET, history=1, ttl=seconds,
                                             storage=StorageType.FILE))


def _watchers() -> int:
    return sum(1 for t in asyncio.all_tasks() if t.get_coro().__qualname__.endswith("_watch_renewals"))


async def _campaigning(leadership: Leadership, stop: asyncio.Event) -> asyncio.Task:
    """Its campaign, once it has seen the leader's renewals (it stands by)."""
    task = asyncio.create_task(leadership.campaign(stop))
    deadline = time.monotonic() + 10
    while leadership._seen_revision is None:
        assert not task.done(), "the standby was elected while the other node led"
        assert time.monotonic() < deadline, "the standby never saw the leader's renewals"
        await asyncio.sleep(0.02)
    return task


async def _led_and_watched(a, b, server_ttl_s: float | None = None):
    """node-a leads and renews; node-b campaigns and has seen its renewals. With
    `server_ttl_s`, the server expires the key that long after its last write."""
    if server_ttl_s is not None:
        await _bucket_expiring_after(a.jetstream(), server_ttl_s)
    stop = asyncio.Event()
    leader = Leadership(a.jetstream(), "node-a", ttl_s=TTL_S, renew_s=RENEW_S)
    standby = Leadership(b.jetstream(), "node-b", ttl_s=TTL_S, renew_s=RENEW_S)
    assert await leader.campaign(stop)
    holding = asyncio.create_task(leader.hold(stop))
    campaign = await _campaigning(standby, stop)
    return stop, leader, standby, holding, campaign


@pytest.fixture
async def two_nodes(fresh_nats):
    a, b = await connect(fresh_nats.url, "node-a"), await connect(fresh_nats.url, "node-b")
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_standby_takes_over_a_dead_leaders_lease_long_before_the_server_expires_it(two_nodes):
    stop, leader, standby, holding, campaign = await _led_and_watched(*two_nodes, server_ttl_s=60)

    # While the leader renews, the standby never leads.
    await asyncio.sleep(3 * TTL_S)
    assert not campaign.done() and leader.valid()

    holding.cancel()  # the leader dies: no renewal, no resignation
    died = time.monotonic()
    assert await asyncio.wait_for(campaign, 10)
    took = time.monotonic() - died
    assert standby.valid() and standby.term is not None and standby.term > (leader.term or 0)
    assert took < 30, f"elected {took:.1f}s after the leader died: it waited for the server's expiry"
    assert not leader.valid()  # its own deadline had passed before the standby could be elected


async def test_a_leader_that_stalled_past_its_deadline_cannot_renew_over_its_successor(two_nodes):
    stop, stalled, successor, holding, campaign = await _led_and_watched(*two_nodes, server_ttl_s=60)
    holding.cancel()  # stalled: it renews no more for a while
    assert await asyncio.wait_for(campaign, 10)
    successor_holds = asyncio.create_task(successor.hold(stop))

    # It wakes up: its term is over and the next renewal is refused; it does not lead again.
    stalled.term, stalled._deadline = stalled.revision, time.monotonic() + TTL_S  # as if mid-term
    await asyncio.wait_for(stalled.hold(stop), 5)
    assert not stalled.valid() and stalled.term is None
    await asyncio.sleep(2 * TTL_S)
    assert successor.valid() and not successor_holds.done()
    stop.set()
    await successor_holds


async def test_a_standby_whose_view_is_stale_waits_for_the_expiry(two_nodes):
    """A renewal it missed makes its conditional take-over fail: it must not lead until the
    key really is free."""
    stop, leader, standby, holding, campaign = await _led_and_watched(*two_nodes, server_ttl_s=2 * TTL_S)
    await asyncio.sleep(3 * RENEW_S)  # renewals
    holding.cancel()
    await asyncio.sleep(RENEW_S + 0.1)  # any renewal still in flight has arrived
    assert standby._seen_revision is not None and standby._seen_revision > 1
    standby._seen_revision -= 1  # the last renewal, as if it never saw it: the take-over's condition is wrong
    frozen_at = time.monotonic()
    assert await asyncio.wait_for(campaign, 10)
    assert time.monotonic() - frozen_at >= TTL_S  # by a create, once the server expired the key


async def test_an_elected_node_leaves_no_watcher_of_the_lease_running(two_nodes):
    a, b = two_nodes
    stop = asyncio.Event()
    first = Leadership(a.jetstream(), "node-a", ttl_s=TTL_S, renew_s=RENEW_S)
    second = Leadership(b.jetstream(), "node-b", ttl_s=TTL_S, renew_s=RENEW_S)
    for _ in range(3):  # three terms change hands
        assert await first.campaign(stop)
        holding = asyncio.create_task(first.hold(stop))
        campaign = await _campaigning(second, stop)
        holding.cancel()
        assert await asyncio.wait_for(campaign, 10)
        await asyncio.sleep(0.1)  # the cancelled watcher's own clean-up
        assert _watchers() == 0, "a leader's watcher of the lease is still running"
        await second.resign()
        first, second = second, first
