"""The look-ahead's two ends: the ticker publishes a due run before its instant with a
`Kjob-Not-Before` header, and the executor holds the message until then, so a herd of
10,000 slots is already in the stream when its second comes and the first sandbox starts on
time. A message without the header (a late slot, a re-publish, an older ticker) runs at once.
"""

from __future__ import annotations

import asyncio
import time

from kjob.bus import names

#: A hold never exceeds this (a header from a clock far ahead must not park a run for hours).
MAX_HOLD_S = 60.0


def headers(not_before_ts: float, now_ts: float) -> dict[str, str]:
    """The headers for a run firing at `not_before_ts` (epoch seconds, the ticker's clock),
    published at `now_ts`; none if that is past. Both the instant and the delay go: an
    executor whose clock differs from the ticker's holds no longer than the delay."""
    if not_before_ts <= now_ts:
        return {}
    return {names.HDR_NOT_BEFORE: f"{not_before_ts:.6f}", names.HDR_HOLD_MS: f"{(not_before_ts - now_ts) * 1000:.0f}"}


async def until_instant(msg, clock_offset_s: float = 0.0) -> None:
    """Wait until the due message's instant, if it came early. Call it first in the handler:
    everything after it (the claim, reading the job) happens at or after the instant.

    The instant is on the database's clock, which the ticker fires by: `clock_offset_s` is how
    far the database's clock is ahead of this host's (kjob.store.database.DatabaseClock), so an
    executor whose host clock runs ahead does not start runs early. Never longer than the delay
    the ticker saw when it published, should the offset be off. A message that waited in the
    stream (executors busy) is not held again once its instant has passed."""
    headers = msg.headers or {}
    value = headers.get(names.HDR_NOT_BEFORE)
    if not value:
        return
    try:
        wait = min(float(value) - (time.time() + clock_offset_s),
                   float(headers.get(names.HDR_HOLD_MS) or "inf") / 1000, MAX_HOLD_S)
    except ValueError:
        return
    if wait > 0:
        await asyncio.sleep(wait)
