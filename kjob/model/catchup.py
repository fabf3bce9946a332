"""Settling downtime: what happens to the slots no ticker fired. Pure.

A ticker starting (after a restart, a failover, an outage) finds, for each job, the slots
between the job's cursor in the ledger and now. Each one is accounted for:

- *pending*: the slot's fire time (the slot plus its jitter) is still to come (a jittered slot
  the old leader had not fired yet). It is handed back to the ticker, which fires it as
  scheduled, at its jittered time (trigger `schedule`).
- every other slot is *late*: it fell due while no ticker fired it. The job's catch-up rule
  decides which late slots run, judged together on the newest ones, so late slots never
  fire at once only to be skipped against each other: `latest` runs the newest late slot
  inside the window, `all` runs every late slot inside it (the overlap policy then starts
  them one after another), `none` runs none. A slot at most `late_grace` late (a failover,
  a quick restart) counts as inside any window, and under `none` the newest such slot still
  runs: a failover does not lose the slot of the moment. Every late slot that runs has
  trigger `catchup`; the others are `missed`, with their reason.

The newest `listed_max` slots are decided one by one (a ledger row each). Older ones, which
a long outage of a frequent job piles up (an `@every 1s` job down a day has 86,400), are
never run (the rule runs the newest) and are accounted for as compact ranges: one record per
job and reason, with the first and last slot and how many there were.

Nothing here raises on stored values a later check would refuse (a window of 99999999 days):
instants are clamped to the calendar, so one bad row cannot stop a ticker.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from uuid import UUID

from kjob.model.durations import format_duration
from kjob.model.job import CatchupPolicy
from kjob.model.policies import fire_time
from kjob.model.run import MissReason, Trigger
from kjob.model.schedule import Schedule

#: Slots of one job decided one by one after downtime; older ones become compact ranges.
LISTED_MAX = 1000
#: Cron slots enumerated to count one range; beyond, the count is a lower bound (`exact`
#: False). `@every` ranges are always counted exactly, by arithmetic.
COUNT_SCAN_MAX = 100_000

EARLIEST = datetime.min.replace(tzinfo=timezone.utc)
LATEST = datetime.max.replace(tzinfo=timezone.utc)


@dataclass(frozen=True, slots=True)
class SettledSlot:
    """One late slot: it runs now (`runs`, trigger `catchup`) or is `missed` for `reason`."""

    slot: datetime
    runs: bool
    #: The ledger's sentence for a missed slot.
    reason: str | None = None
    #: `outside_catchup_window` or `catchup_policy` for a missed slot.
    cause: MissReason | None = None

    @property
    def trigger(self) -> Trigger:
        return Trigger.catchup if self.runs else Trigger.schedule


@dataclass(frozen=True, slots=True)
class MissedRange:
    """`count` slots from `first` to `last` (inclusive), none of which runs, for `reason`."""

    first: datetime
    last: datetime
    count: int
    #: False when the count stopped at COUNT_SCAN_MAX: then there were at least `count`.
    exact: bool
    reason: str
    cause: MissReason


@dataclass(frozen=True, slots=True)
class Settlement:
    slots: list[SettledSlot]
    ranges: list[MissedRange]
    #: Every slot up to this instant is settled; the ticker fires the job's slots after it
    #: (the first of them may be pending: late, or jittered and not yet due).
    cursor: datetime

    @property
    def missed(self) -> int:
        return sum(1 for s in self.slots if not s.runs) + sum(r.count for r in self.ranges)

    def missed_by_cause(self) -> dict[MissReason, int]:
        """How many slots are missed for each cause, listed or in ranges (causes with none left out)."""
        counts: dict[MissReason, int] = {}
        for s in self.slots:
            if s.cause is not None:
                counts[s.cause] = counts.get(s.cause, 0) + 1
        for r in self.ranges:
            counts[r.cause] = counts.get(r.cause, 0) + r.count
        return counts


def minus(moment: datetime, span: timedelta) -> datetime:
    """`moment - span`, clamped to the calendar's first instant instead of overflowing."""
    try:
        return moment - span
    except OverflowError:
        return EARLIEST


def plus(moment: datetime, span: timedelta) -> datetime:
    """`moment + span`, clamped to the calendar's last instant instead of overflowing."""
    try:
        return moment + span
    except OverflowError:
        return LATEST


def resume_point(last_slot: datetime | None, floor: datetime) -> datetime:
    """Where settling a job starts: after its last slot in the ledger, and never before
    `floor` (when it was created or last enabled), so enabling a paused job settles none of the
    slots that passed while it was paused."""
    return max(last_slot, floor) if last_slot is not None else floor


def settle_job(job_id: UUID, schedule: Schedule, tz: str, jitter: timedelta, policy: CatchupPolicy,
               after: datetime, now: datetime, late_grace: timedelta) -> Settlement:
    """`settle` for one job, its slots judged by when the ticker fires them: the slot plus the
    job's own jitter (kjob.model.policies.fire_time), so a jittered slot not yet fired is
    pending, not downtime."""
    return settle(schedule, tz, after, now, policy, late_grace,
                  fire_at=lambda slot: fire_time(job_id, schedule, tz, slot, jitter))


def settle(
    schedule: Schedule,
    tz: str,
    after: datetime,
    now: datetime,
    policy: CatchupPolicy,
    late_grace: timedelta,
    fire_at: Callable[[datetime], datetime] | None = None,
    listed_max: int = LISTED_MAX,
) -> Settlement:
    """Settle the job's slots in (`after`, `now`] (see the module's docstring).

    `fire_at(slot)` is when the ticker fires a slot (its jitter added); default the slot.
    """
    late_from = minus(now, late_grace)
    window_start = minus(now, policy.window)
    fire = fire_at or (lambda s: s)
    recent, more = newest_slots(schedule, tz, after, now, listed_max)
    # Fire times grow with slots (jitter never passes the next slot): pending ones are a suffix.
    down = list(itertools.takewhile(lambda s: fire(s) <= now, recent))
    recent_enough = [s for s in down if fire(s) >= late_from]  # a failover's, a quick restart's
    inside = [s for s in down if s > window_start or fire(s) >= late_from]
    inside_set = set(inside)
    if policy.policy == "all":
        runs = set(inside)
    elif policy.policy == "latest":
        runs = set(inside[-1:])
    else:
        runs = set(recent_enough[-1:])
    window = format_duration(policy.window)
    outside_reason = f"scheduler was down at this slot, which is outside the catch-up window ({window})"
    policy_reason = f"scheduler was down at this slot; catch-up policy '{policy.policy}' did not run it"
    settled = [
        SettledSlot(s, True) if s in runs
        else SettledSlot(s, False, outside_reason, MissReason.outside_catchup_window) if s not in inside_set
        else SettledSlot(s, False, policy_reason, MissReason.catchup_policy)
        for s in down
    ]
    ranges: list[MissedRange] = []
    if more:
        oldest = recent[0]
        # (after, oldest) splits at the window's start: slots at or before it are outside.
        outside_before = plus(window_start, timedelta(microseconds=1)) if window_start < oldest else oldest
        outside = count_slots(schedule, tz, after, outside_before)
        if outside is not None:
            ranges.append(MissedRange(*outside, reason=f"scheduler was down at these slots, outside the catch-up "
                                                        f"window ({window})", cause=MissReason.outside_catchup_window))
        if window_start < oldest:
            kept = "runs only the newest slots" if policy.policy == "all" else "did not run them"
            inner = count_slots(schedule, tz, max(after, window_start), oldest)
            if inner is not None:
                ranges.append(MissedRange(*inner, reason=f"scheduler was down at these slots; catch-up policy "
                                                         f"'{policy.policy}' {kept}", cause=MissReason.catchup_policy))
    cursor = down[-1] if down else after
    return Settlement(settled, ranges, cursor)


def newest_slots(schedule: Schedule, tz: str, after: datetime, until: datetime, n: int) -> tuple[list[datetime], bool]:
    """The newest `n` slots in (`after`, `until`], ascending, and whether older ones exist.

    Searches back from `until` over a span that grows fourfold until it holds `n` slots or
    reaches `after`, so the work is a few times `n` however long ago `after` is.
    """
    if until <= after or n <= 0:
        return [], False
    first = schedule.next_slot(after, tz)
    if first is None or first > until:
        return [], False
    second = schedule.next_slot(first, tz)
    gap = (second - first) if second is not None else timedelta(seconds=1)
    span = _times(max(gap, timedelta(seconds=1)), n)
    while True:
        start = max(minus(until, span), after)
        found: deque[datetime] = deque(maxlen=n)
        for slot in _until(schedule.slots(start, tz), plus(until, timedelta(microseconds=1))):
            found.append(slot)
        if len(found) >= n or start == after:
            return list(found), first < found[0]
        span = _times(span, 4)


def _times(span: timedelta, k: int) -> timedelta:
    try:
        return span * k
    except OverflowError:
        return timedelta.max


def count_slots(schedule: Schedule, tz: str, after: datetime, before: datetime) -> tuple[datetime, datetime, int, bool] | None:
    """(first, last, count, exact) of the slots in (`after`, `before`), or None if there are none."""
    first = schedule.next_slot(after, tz)
    if first is None or first >= before:
        return None
    interval = schedule.interval
    if interval is not None:
        count = (before - first - timedelta(microseconds=1)) // interval + 1
        return first, first + (count - 1) * interval, count, True
    last, count = first, 0
    for slot in _until(schedule.slots(after, tz), before):
        last, count = slot, count + 1
        if count >= COUNT_SCAN_MAX:
            # The last slot is still found exactly: the newest one before `before`.
            tail, _ = newest_slots(schedule, tz, slot, before - timedelta(microseconds=1), 1)
            return first, tail[-1] if tail else slot, count, not tail
    return first, last, count, True


def _until(slots: Iterator[datetime], before: datetime) -> Iterator[datetime]:
    for slot in slots:
        if slot >= before:
            return
        yield slot
