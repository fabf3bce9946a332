"""The pull loop's look-ahead side, on a real nats-server: a message that came early waits for
its instant outside the run slots, so runs due now are never queued behind it, and its ack
deadline is kept while it waits, so JetStream does not hand it out again meanwhile."""

from __future__ import annotations

import asyncio
import time

from kjob.bus import hold, names
from kjob.bus.consume import consume
from kjob.bus.setup import BusSettings, connect, ensure_consumer, ensure_streams
from tests.support.pipeline import until


async def _now(value):
    return value


async def _started(fresh_nats, ack_wait_s: float, messages: list[tuple[str, dict]]):
    nc = await connect(fresh_nats.url, "consume-test")
    js = nc.jetstream()
    await ensure_streams(js, 1)
    sub = await ensure_consumer(js, names.RUNS_STREAM, names.EXECUTOR_CONSUMER, names.RUN_DUE_ALL,
                                BusSettings(ack_wait_s=ack_wait_s))
    for body, headers in messages:
        await js.publish(names.run_due("t"), body.encode(), headers=headers or None)
    return nc, sub


async def test_an_early_message_gives_its_slot_to_the_runs_due_now(fresh_nats):
    now = time.time()
    early = [(f"early-{i}", hold.headers(now + 3.0, now)) for i in range(3)]
    nc, sub = await _started(fresh_nats, 30, [*early, ("now", {})])
    published = time.time()
    handled: dict[str, float] = {}
    stop = asyncio.Event()

    async def handle(msg):
        handled[msg.data.decode()] = time.time()
        await msg.ack()

    loop = asyncio.create_task(consume(sub, handle, concurrency=1, stop=stop, name="test",
                                       hold=hold.wait_s, keepalive_s=1))
    try:
        await until(lambda: _now(len(handled) == 4), 15, "every message handled")
    finally:
        stop.set()
        await loop
        await nc.close()
    # One slot, three early messages fetched before it: the due one still ran at once.
    assert handled["now"] - published < 1.5, handled
    assert all(handled[f"early-{i}"] >= now + 2.95 for i in range(3)), handled


async def test_a_message_held_past_its_ack_wait_is_not_handed_out_again(fresh_nats):
    now = time.time()
    nc, sub = await _started(fresh_nats, 1.0, [("early", hold.headers(now + 3.0, now))])
    deliveries: list[int] = []
    stop = asyncio.Event()

    async def handle(msg):
        deliveries.append(msg.metadata.num_delivered)
        await msg.ack()

    loop = asyncio.create_task(consume(sub, handle, concurrency=4, stop=stop, name="test",
                                       hold=hold.wait_s, keepalive_s=1.0 / 3))
    try:
        await until(lambda: _now(deliveries), 15, "the held message handled")
        await asyncio.sleep(1.5)  # a redelivery, had there been one, would come within ack_wait
    finally:
        stop.set()
        await loop
        await nc.close()
    assert deliveries == [1], deliveries


async def test_a_stopping_consumer_gives_back_what_it_has_not_started(fresh_nats):
    now = time.time()
    # Held for long, so that however slowly this machine gets here it is still held at the stop.
    nc, sub = await _started(fresh_nats, 30, [("early", hold.headers(now + 60.0, now))])
    stop = asyncio.Event()
    handled: list[str] = []

    async def handle(msg):
        handled.append(msg.data.decode())
        await msg.ack()

    loop = asyncio.create_task(consume(sub, handle, concurrency=2, stop=stop, name="test", hold=hold.wait_s))
    async def holding():
        return (await sub.consumer_info()).num_ack_pending == 1
    await until(holding, 5, "the early message fetched and held")
    stop.set()  # before its instant: this consumer never starts it
    await loop
    # Given back, not left to its 30 s ack deadline: the next consumer has it at once.
    js = nc.jetstream()
    again = await js.pull_subscribe(names.RUN_DUE_ALL, durable=names.EXECUTOR_CONSUMER, stream=names.RUNS_STREAM)
    started = time.monotonic()
    (msg,) = await again.fetch(1, timeout=5)
    assert msg.data == b"early" and msg.metadata.num_delivered == 2 and time.monotonic() - started < 5
    assert handled == []
    await nc.close()
