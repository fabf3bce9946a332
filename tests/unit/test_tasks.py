"""Stopping tasks: the caller's own cancellation is never eaten on the way."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kjob._tasks import cancel_and_wait


async def _slow_to_stop(stopping: asyncio.Event, fail: bool = False) -> None:
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        stopping.set()
        await asyncio.sleep(0.3)  # its clean-up (a sandbox being killed) takes a while
        if fail:
            raise RuntimeError("the clean-up broke")
        raise


async def test_a_caller_cancelled_while_it_waits_for_a_task_to_stop_is_cancelled():
    stopping = asyncio.Event()
    task = asyncio.create_task(_slow_to_stop(stopping))
    await asyncio.sleep(0)
    caller = asyncio.create_task(cancel_and_wait(task))
    await asyncio.wait_for(stopping.wait(), 5)
    caller.cancel()  # the node stops while the executor waits for its sandbox
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()


async def test_an_error_raised_while_stopping_is_logged_not_raised(caplog):
    stopping = asyncio.Event()
    task = asyncio.create_task(_slow_to_stop(stopping, fail=True), name="sandbox-run")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="kjob._tasks"):
        await cancel_and_wait(task)
    assert "sandbox-run" in caplog.text and "the clean-up broke" in caplog.text
