"""The executor's end of the look-ahead: a due run published early is held until its instant,
by the database's clock (the ticker's), whatever this host's clock says."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kjob.bus import hold


@dataclass
class _Msg:
    headers: dict[str, str] = field(default_factory=dict)


async def test_an_executor_whose_clock_runs_ahead_still_holds_until_the_databases_instant():
    ahead = 0.4  # this host's clock runs 0.4 s ahead of the database's
    db_now = time.time() - ahead
    msg = _Msg(hold.headers(not_before_ts=db_now + 0.6, now_ts=db_now))
    # By this host's clock the instant is only 0.2 s away: held by it, the run starts 0.4 s early.
    assert 0.55 <= hold.wait_s(msg, clock_offset_s=-ahead) <= 0.6


async def test_a_message_without_a_hold_or_past_its_instant_runs_at_once():
    assert hold.wait_s(_Msg()) == 0
    late = _Msg(hold.headers(not_before_ts=time.time() + 5, now_ts=time.time()))
    assert hold.wait_s(late, clock_offset_s=10.0) == 0  # the database is 10 s ahead: past already


def test_a_hold_is_never_longer_than_the_delay_the_ticker_saw_nor_an_hour():
    now = time.time()
    assert hold.wait_s(_Msg(hold.headers(now + 5, now)), clock_offset_s=-100) <= 5.0
    assert hold.wait_s(_Msg(hold.headers(now + 7200, now))) == hold.MAX_HOLD_S
    assert hold.wait_s(_Msg({hold.names.HDR_NOT_BEFORE: "soon"})) == 0
