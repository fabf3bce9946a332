"""Settling downtime (kjob.model.catchup): every slot between the cursor and now is pending (its
fire time still to come), run, missed one by one, or inside a compact missed range; never none
of these, never two."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from kjob.model.catchup import (COUNT_SCAN_MAX, EARLIEST, count_slots, newest_slots, resume_point, settle,
                                settle_job)
from kjob.model.durations import parse_duration
from kjob.model.job import CatchupPolicy
from kjob.model.policies import fire_time
from kjob.model.run import MissReason
from kjob.model.schedule import Schedule

UTC = timezone.utc
GRACE = timedelta(seconds=15)
NOW = datetime(2026, 6, 1, 12, 0, 30, 250_000, tzinfo=UTC)


def policy(window: str = "1h", kind: str = "latest") -> CatchupPolicy:
    return CatchupPolicy(window=parse_duration(window), policy=kind)


def all_slots(expr: str, after: datetime, until: datetime, tz: str = "UTC") -> list[datetime]:
    out = []
    for s in Schedule.parse(expr).slots(after, tz):
        if s > until:
            break
        out.append(s)
    return out


def accounted(expr: str, after: datetime, result, tz: str = "UTC") -> None:
    """Every slot in (after, cursor] is in exactly one place; the cursor is where firing resumes."""
    expected = all_slots(expr, after, result.cursor, tz)
    listed = [s.slot for s in result.slots]
    assert listed == sorted(set(listed))
    in_ranges = sum(r.count for r in result.ranges)
    assert all(r.exact for r in result.ranges)
    assert len(listed) + in_ranges == len(expected)
    # ranges are older than every listed slot, and do not overlap one another
    spans = sorted((r.first, r.last) for r in result.ranges)
    for (_, last), (first, _) in zip(spans, spans[1:]):
        assert last < first
    if listed and spans:
        assert spans[-1][1] < listed[0]
    assert set(listed) <= set(expected)


def test_every_second_down_20_minutes_lists_the_newest_and_counts_the_rest():
    after = NOW - timedelta(minutes=20)
    result = settle(Schedule.parse("@every 1s"), "UTC", after, NOW, policy(), GRACE)
    accounted("@every 1s", after, result)
    # every slot is late (none still to come): `latest` runs the newest one, as a catch-up;
    # the 15 younger than the grace are late too, not fired together to skip one another
    assert result.cursor == datetime(2026, 6, 1, 12, 0, 30, tzinfo=UTC)
    assert [(s.slot, s.trigger.value) for s in result.slots if s.runs] == [(result.cursor, "catchup")]
    assert len(result.slots) == 1000
    assert [r.count for r in result.ranges] == [1200 - 1000]
    assert result.ranges[0].first == datetime(2026, 6, 1, 11, 40, 31, tzinfo=UTC)
    assert result.ranges[0].last + timedelta(seconds=1) == result.slots[0].slot
    assert "catch-up policy 'latest'" in result.ranges[0].reason and result.ranges[0].cause is MissReason.catchup_policy
    assert result.missed == 1200 - 1


def test_every_minute_down_20_hours_with_a_1h_window_runs_the_newest_slot():
    after = NOW - timedelta(hours=20)
    result = settle(Schedule.parse("* * * * *"), "UTC", after, NOW, policy("1h"), GRACE)
    accounted("* * * * *", after, result)
    runs = [s.slot for s in result.slots if s.runs]
    assert runs == [datetime(2026, 6, 1, 12, 0, tzinfo=UTC)]  # 30 s old: newest, not 3 min old
    assert result.cursor == runs[0]
    assert len(result.slots) == 1000
    # 20 h = 1,200 slots: 200 more, all before the window, in one range
    assert [(r.count, r.cause) for r in result.ranges] == [(200, "outside_catchup_window")]
    inside = [s for s in result.slots if s.slot > NOW - timedelta(hours=1)]
    assert len(inside) == 60
    assert all(s.cause == "catchup_policy" for s in inside if not s.runs)
    outside = [s for s in result.slots if s.slot <= NOW - timedelta(hours=1)]
    assert outside and all(s.cause == "outside_catchup_window" and not s.runs for s in outside)


def test_all_runs_the_window_and_ranges_split_at_the_window_start():
    after = NOW - timedelta(days=3)
    result = settle(Schedule.parse("* * * * *"), "UTC", after, NOW, policy("1d", "all"), GRACE)
    accounted("* * * * *", after, result)
    assert sum(s.runs for s in result.slots) == 1000  # the newest 1,000 are all inside a day
    outside, inside = result.ranges
    assert outside.cause == "outside_catchup_window" and inside.cause == "catchup_policy"
    assert outside.last <= NOW - timedelta(days=1) < inside.first
    assert "runs only the newest slots" in inside.reason
    assert outside.count + inside.count == 3 * 1440 - 1000


def test_latest_runs_the_newest_late_slot_even_when_it_is_younger_than_the_grace():
    now = datetime(2026, 6, 1, 12, 0, 5, tzinfo=UTC)
    result = settle(Schedule.parse("* * * * *"), "UTC", now - timedelta(hours=2), now, policy(), GRACE)
    assert result.cursor == datetime(2026, 6, 1, 12, 0, tzinfo=UTC)  # 12:00 is 5 s late: late, not pending
    assert [(s.slot, s.trigger.value) for s in result.slots if s.runs] == [(result.cursor, "catchup")]
    assert all(s.reason == "scheduler was down at this slot; catch-up policy 'latest' did not run it"
               for s in result.slots if not s.runs and s.slot > now - timedelta(hours=1))


def test_a_failover_loses_no_slot_even_under_none_or_a_short_window():
    """A slot at most the grace late counts as inside any window; under `none` the newest such
    slot runs too (the slot of the moment of a failover). Older late slots follow the rule."""
    every = Schedule.parse("@every 5s")
    now = datetime(2026, 6, 1, 12, 0, 12, tzinfo=UTC)  # 12:00:00, :05 and :10 are late, all within the grace
    for kind, ran in (("none", ["12:00:10"]), ("latest", ["12:00:10"]), ("all", ["12:00:00", "12:00:05", "12:00:10"])):
        result = settle(every, "UTC", datetime(2026, 6, 1, 11, 59, 55, tzinfo=UTC), now, policy("1s", kind), GRACE)
        assert [s.slot.strftime("%H:%M:%S") for s in result.slots if s.runs] == ran, kind
        assert all(s.trigger.value == "catchup" for s in result.slots if s.runs)
        assert result.cursor == datetime(2026, 6, 1, 12, 0, 10, tzinfo=UTC)


def test_all_judges_late_slots_on_the_window_the_grace_extends():
    every = Schedule.parse("@every 10s")
    now = datetime(2026, 6, 1, 12, 1, 0, tzinfo=UTC)
    result = settle(every, "UTC", now - timedelta(minutes=1), now, policy("25s", "all"), GRACE)
    # 12:00:40 and :50 are inside 25 s, 12:01:00 too (0 s late); older ones are outside
    assert [s.slot.second for s in result.slots if s.runs] == [40, 50, 0]
    assert {s.cause for s in result.slots if not s.runs} == {"outside_catchup_window"}


def test_none_and_no_downtime():
    after = NOW - timedelta(minutes=10)
    result = settle(Schedule.parse("* * * * *"), "UTC", after, NOW, policy(kind="none"), GRACE)
    assert len(result.slots) == 10 and not any(s.runs for s in result.slots)
    quiet = settle(Schedule.parse("0 0 1 1 *"), "UTC", after, NOW, policy(), GRACE)
    assert quiet.slots == [] and quiet.ranges == [] and quiet.cursor == after


def test_a_jittered_slot_not_yet_fired_is_pending_not_downtime():
    job = uuid.UUID(int=4)  # a fixed id: its 12:00 slot fires at 12:23:34, past the grace (a random one may not)
    hourly = Schedule.parse("0 * * * *")
    jitter = timedelta(minutes=30)
    slot = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    due = fire_time(job, hourly, "UTC", slot, jitter)
    assert due > slot + GRACE, "pick a job id whose jitter is longer than the grace"
    now = due - timedelta(seconds=1)  # the old leader died just before firing it
    result = settle(hourly, "UTC", slot - timedelta(minutes=30), now, policy(kind="none"), GRACE,
                    fire_at=lambda s: fire_time(job, hourly, "UTC", s, jitter))
    assert result.slots == [] and result.cursor < slot  # handed back, to fire at its own time


def test_settle_job_judges_each_slot_by_the_jobs_own_jitter():
    job = uuid.UUID(int=4)  # its slot of 12:00 fires at 12:23:34
    hourly = Schedule.parse("0 * * * *")
    jitter = timedelta(minutes=30)
    slot = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    now = fire_time(job, hourly, "UTC", slot, jitter) - timedelta(seconds=1)
    assert now > slot + timedelta(minutes=20)
    after = slot - timedelta(minutes=30)
    jittered = settle_job(job, hourly, "UTC", jitter, policy(kind="none"), after, now, GRACE)
    assert jittered.slots == [] and jittered.cursor == after  # not fired yet: handed back, not missed
    plain = settle_job(job, hourly, "UTC", timedelta(0), policy(kind="none"), after, now, GRACE)
    assert [(s.slot, s.runs, s.cause) for s in plain.slots] == [(slot, False, MissReason.catchup_policy)]


def test_settling_resumes_after_the_last_slot_and_never_before_the_job_was_enabled():
    enabled = NOW - timedelta(minutes=5)
    assert resume_point(None, enabled) == enabled  # a new job: nothing before it existed
    assert resume_point(NOW - timedelta(minutes=1), enabled) == NOW - timedelta(minutes=1)
    # paused a day and enabled 5 minutes ago: the paused day's slots are not downtime
    after = resume_point(NOW - timedelta(days=1), enabled)
    result = settle(Schedule.parse("* * * * *"), "UTC", after, NOW, policy(kind="none"), GRACE)
    assert after == enabled and len(result.slots) == 5 and result.ranges == []


def test_missed_slots_are_counted_by_cause_listed_and_in_ranges():
    after = NOW - timedelta(hours=20)
    result = settle(Schedule.parse("* * * * *"), "UTC", after, NOW, policy("1h"), GRACE)
    by_cause = result.missed_by_cause()
    # the 60 minutes inside the window but the newest missed by the policy; the rest outside it
    assert by_cause == {MissReason.catchup_policy: 59, MissReason.outside_catchup_window: 1200 - 60}
    assert sum(by_cause.values()) == result.missed
    assert settle(Schedule.parse("0 0 1 1 *"), "UTC", after, NOW, policy(), GRACE).missed_by_cause() == {}


@pytest.mark.parametrize("window", ["99999999d", "999999999d"])
def test_a_window_beyond_the_calendar_is_clamped_not_an_overflow(window):
    huge = CatchupPolicy.model_construct(window=timedelta(days=int(window[:-1])), policy="latest")
    after = NOW - timedelta(hours=3)
    result = settle(Schedule.parse("* * * * *"), "UTC", after, NOW, huge, GRACE)
    accounted("* * * * *", after, result)
    assert [s.slot for s in result.slots if s.runs] == [datetime(2026, 6, 1, 12, 0, tzinfo=UTC)]
    assert "catch-up policy 'latest'" in result.slots[0].reason and result.slots[0].cause is MissReason.catchup_policy


def test_a_job_created_at_the_dawn_of_time_settles_in_bounded_work():
    result = settle(Schedule.parse("@every 1s"), "UTC", datetime(1971, 1, 1, tzinfo=UTC), NOW, policy(), GRACE)
    assert len(result.slots) <= 1000 and result.ranges[0].count > 1_700_000_000 and result.ranges[0].exact


def test_newest_slots_across_a_dst_change():
    # every 30 min in New York across the fall-back night: the repeated hour is real time
    after = datetime(2026, 11, 1, 4, 0, tzinfo=UTC)
    until = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
    found, more = newest_slots(Schedule.parse("*/30 * * * *"), "America/New_York", after, until, 3)
    assert found == all_slots("*/30 * * * *", after, until, "America/New_York")[-3:] and more


def test_count_slots_caps_cron_counting_but_finds_the_last_slot():
    sched = Schedule.parse("* * * * * *")
    after = datetime(2026, 1, 1, tzinfo=UTC)
    before = after + timedelta(seconds=COUNT_SCAN_MAX + 500)
    first, last, count, exact = count_slots(sched, "UTC", after, before)
    assert first == after + timedelta(seconds=1) and last == before - timedelta(seconds=1)
    assert count == COUNT_SCAN_MAX and not exact
    assert count_slots(sched, "UTC", after, after + timedelta(seconds=1)) is None
    assert EARLIEST.year == 1
