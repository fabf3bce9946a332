"""The look-ahead's two ends: the ticker publishes a due run before its instant with a
`Kjob-Not-Before` header, and the executor holds the message until then, so a herd of
10,000 slots is already in the stream when its second comes and the first sandbox starts on
time. A message without the header (a late slot, a re-publish, an older ticker) runs at once.
"""

from __future__ import annotations

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


def wait_s(msg, clock_offset_s: float = 0.0) -> float:
    """How long the due message is still to be held: 0 when it has no hold or its instant has
    passed (a message that waited in the stream while executors were busy is not held again).

    The instant is on the database's clock, which the ticker fires by: `clock_offset_s` is how
    far the database's clock is ahead of this host's (kjob.store.database.DatabaseClock), so an
    executor whose host clock runs ahead does not start runs early. Never longer than the delay
    the ticker saw when it published, should the offset be off."""
    headers = msg.headers or {}
    value = headers.get(names.HDR_NOT_BEFORE)
    if not value:
        return 0.0
    try:
        wait = min(float(value) - (time.time() + clock_offset_s),
                   float(headers.get(names.HDR_HOLD_MS) or "inf") / 1000, MAX_HOLD_S)
    except ValueError:
        return 0.0
    return max(wait, 0.0)
