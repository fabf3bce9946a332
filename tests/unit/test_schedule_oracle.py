"""The cron engine against cronsim, an independent implementation, as an oracle.

Many random 5-field expressions, in several zones (four with DST, two of them south of the
equator, and one with a half-hour offset), from starts around the DST changes; the next fire
times must be the same. Where the two legitimately differ the oracle's domain is restricted, and why:

- no seconds field: cronsim reads 5 fields only (ours also reads 6, tested in test_schedule.py);
- no `?`, `L`, `W`, `#`: not in our grammar;
- starts on whole minutes, the only kind of `after` the ticker passes;
- no Australia/Lord_Howe: its DST shift is half an hour, and cronsim applies the old offset to
  the rest of the day of the change (23:00 on 2026-10-04 at +10:30, zoneinfo says +11:00).
"""

from __future__ import annotations

import random
from datetime import datetime, timezone
from itertools import islice
from zoneinfo import ZoneInfo

from cronsim import CronSim

from kjob.model.schedule import Schedule

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Sydney", "Asia/Kolkata", "America/Santiago"]
POOL = {
    "minute": ["*", "*/7", "0", "5,35", "10-20", "10-40/15", "59", "30", "0,15,30,45"],
    "hour": ["*", "*/5", "0", "2", "3", "1-3,22", "23", "2-3", "*/2"],
    "dom": ["*", "1", "15", "28-31", "1,10,20", "*/3", "8-14"],
    "month": ["*", "3", "MAR", "OCT-NOV", "*/4", "DEC", "4,10"],
    "dow": ["*", "SUN", "1-5", "SAT,SUN", "0", "5", "*/2"],
}
#: Around the DST changes of both hemispheres, and a quiet date.
STARTS = ["2026-03-07T00:00", "2026-03-28T12:00", "2026-10-03T00:00", "2026-10-24T12:00", "2026-10-31T12:00",
          "2026-06-15T00:00"]
N = 8


def test_next_fire_times_agree_with_cronsim_for_random_expressions_and_zones() -> None:
    rng = random.Random(20261201)
    crossed = 0  # comparisons whose slots span a change of the zone's UTC offset
    for _ in range(1000):
        expr = " ".join(rng.choice(POOL[f]) for f in POOL)
        tz = rng.choice(ZONES)
        start = datetime.fromisoformat(rng.choice(STARTS)).replace(tzinfo=timezone.utc)
        ours = list(islice(Schedule.parse(expr).slots(start, tz), N))
        local_start = start.astimezone(ZoneInfo(tz))  # both yield strictly after the start
        theirs = [t.astimezone(timezone.utc) for t in islice(CronSim(expr, local_start), N)]
        assert ours == theirs, f"{expr!r} in {tz} after {start:%Y-%m-%dT%H:%M}Z"
        offsets = {t.astimezone(ZoneInfo(tz)).utcoffset() for t in [start, *ours]}
        crossed += len(offsets) > 1
    assert crossed >= 200, f"only {crossed} cases crossed a DST change: the sample no longer tests DST"
