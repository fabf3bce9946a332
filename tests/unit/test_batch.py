"""Calls gathered into batches (kjob.store._batch): what a caller sees, without a database."""

from __future__ import annotations

import asyncio

import pytest

from kjob.store._batch import Batched


class Recorder:
    """A `run` that answers each key with its double, after the test lets it."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.batches: list[list[int]] = []
        self.go = asyncio.Event()
        self.fail = fail

    async def __call__(self, items: dict[int, str | None]) -> dict[int, int | Exception]:
        self.batches.append(list(items))
        await self.go.wait()
        if self.fail is not None:
            raise self.fail
        # a negative key is "not found"; an item "refuse" is refused alone
        return {k: ValueError(f"refused {k}") if item == "refuse" else 2 * k for k, item in items.items() if k >= 0}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lone_call_goes_at_once_and_the_calls_made_meanwhile_go_together():
    run = Recorder()
    batched = Batched(run, missing=None, in_flight=1)
    first = asyncio.create_task(batched(1))
    await settle()
    assert run.batches == [[1]]  # nothing waited for company
    rest = [asyncio.create_task(batched(k)) for k in (2, 3, -4)]
    await settle()
    assert run.batches == [[1]]  # they wait for the batch in the database
    run.go.set()
    assert await first == 2
    assert await asyncio.gather(*rest) == [4, 6, None]  # a key left out gets `missing`
    assert run.batches == [[1], [2, 3, -4]]


async def test_a_key_asked_twice_at_once_goes_in_two_batches():
    run = Recorder()
    batched = Batched(run, missing=None, in_flight=1)
    calls = [asyncio.create_task(batched(k)) for k in (7, 7, 8)]
    await settle()
    run.go.set()
    assert await asyncio.gather(*calls) == [14, 14, 16]
    assert run.batches == [[7], [7, 8]]


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_still_goes():
    run = Recorder(fail=ConnectionResetError("the database went away"))
    batched = Batched(run, missing=None)
    calls = [asyncio.create_task(batched(k)) for k in (1, 2)]
    await settle()
    run.go.set()
    for call in calls:
        with pytest.raises(ConnectionResetError):
            await call
    run.fail = None
    assert await batched(3) == 6


async def test_a_caller_cancelled_before_its_batch_went_is_left_out_and_batches_are_bounded():
    run = Recorder()
    batched = Batched(run, missing=None, max_size=2, in_flight=1)
    first = asyncio.create_task(batched(1))
    await settle()
    gone = asyncio.create_task(batched(2))
    rest = [asyncio.create_task(batched(k)) for k in (3, 4, 5)]
    await settle()
    gone.cancel()
    run.go.set()
    assert await first == 2 and await asyncio.gather(*rest) == [6, 8, 10]
    assert run.batches == [[1], [3, 4], [5]]


async def test_an_item_refused_fails_its_caller_alone():
    run = Recorder()
    run.go.set()
    batched = Batched(run, missing=None)
    calls = [asyncio.create_task(batched(1)), asyncio.create_task(batched(2, "refuse")), asyncio.create_task(batched(3))]
    assert await calls[0] == 2 and await calls[2] == 6
    with pytest.raises(ValueError, match="refused 2"):
        await calls[1]


async def test_up_to_in_flight_batches_go_at_once_and_the_rest_wait_for_one_back():
    run = Recorder()
    batched = Batched(run, missing=None, in_flight=2)
    first = asyncio.create_task(batched(1))
    await settle()
    second = asyncio.create_task(batched(2))  # one batch is out: this one need not wait for it
    await settle()
    assert run.batches == [[1], [2]]
    rest = [asyncio.create_task(batched(k)) for k in (3, 4)]
    await settle()
    assert run.batches == [[1], [2]]  # two are out: these wait, together
    run.go.set()
    assert [await first, await second, *await asyncio.gather(*rest)] == [2, 4, 6, 8]
    assert run.batches == [[1], [2], [3, 4]]


async def test_the_others_of_a_batch_whose_sender_was_cancelled_hear_it_was_cut_short():
    run = Recorder()
    batched = Batched(run, missing=None, in_flight=1)
    sender = asyncio.create_task(batched(1))
    await settle()
    assert run.batches == [[1]]  # the first caller's own task sends its batch
    other = asyncio.create_task(batched(2))
    await settle()
    sender.cancel()  # a stopping node: its batch is cut short
    with pytest.raises(asyncio.CancelledError):
        await sender
    run.go.set()
    assert await other == 4  # it was still queued: it goes in the next batch
    blocked = Recorder()
    batched = Batched(blocked, missing=None, max_size=1, in_flight=1)
    first = asyncio.create_task(batched(1))
    await settle()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    blocked.go.set()
    assert await batched(3) == 6  # the batcher goes on
