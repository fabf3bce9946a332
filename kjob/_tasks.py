"""Stopping asyncio tasks, and waiting on a stop."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


async def cancel_and_wait(*tasks: asyncio.Task) -> None:
    """Cancel `tasks` and wait until they ended. Their cancellation is what was asked for; the
    caller's own (it is cancelled while it waits) goes on up, unlike a `suppress(BaseException)`
    around the await, which eats it. An error a task raised as it stopped is logged."""
    for task in tasks:
        task.cancel()
    for task, result in zip(tasks, await asyncio.gather(*tasks, return_exceptions=True)):
        if isinstance(result, Exception):
            log.warning("task %s failed as it stopped: %r", task.get_name(), result)


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `stop`: True if it was set (the loop ends), False if the time
    ran out (the loop's next round)."""
    try:
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that comes
        # as the wait ends, and the loop that was being stopped would go on. The same below.
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        return False
    return True
