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
    """The header for a run firing at `not_before_ts` (epoch seconds); none if that is past."""
    return {names.HDR_NOT_BEFORE: f"{not_before_ts:.6f}"} if not_before_ts > now_ts else {}


async def until_instant(msg) -> None:
    """Wait until the due message's instant, if it came early. Call it first in the handler:
    everything after it (the claim, reading the job) happens at or after the instant."""
    value = (msg.headers or {}).get(names.HDR_NOT_BEFORE)
    if not value:
        return
    try:
        wait = min(float(value) - time.time(), MAX_HOLD_S)
    except ValueError:
        return
    if wait > 0:
        await asyncio.sleep(wait)
