"""Schedules: the grammar, its errors, and slots across DST (DESIGN.md invariant 3).

DST dates below were read from zoneinfo for 2026:
  America/New_York     2026-03-08 02:00 EST -> 03:00 EDT (07:00Z); 2026-11-01 02:00 EDT -> 01:00 EST (06:00Z)
  Europe/Berlin        2026-03-29 02:00 -> 03:00 (01:00Z);           2026-10-25 03:00 -> 02:00 (01:00Z)
  Australia/Lord_Howe  2026-10-04 02:00 -> 02:30 (15:30Z on 10-03); 2026-04-05 02:00 -> 01:30 (15:00Z on 04-04)
  Australia/Sydney     2026-10-04 02:00 -> 03:00 (16:00Z on 10-03); 2026-04-05 03:00 -> 02:00 (16:00Z on 04-04)
  America/Santiago     2026-09-06 00:00 -> 01:00 (04:00Z)
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from itertools import islice
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from kjob.errors import ScheduleError
from kjob.model.schedule import Schedule, next_slots

UTC = timezone.utc


def z(text: str) -> datetime:
    """`2026-03-08T07:00` (UTC) as an aware datetime."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def utc(slots: list[datetime]) -> list[str]:
    return [s.strftime("%Y-%m-%dT%H:%M:%S") for s in slots]


def run(expr: str, tz: str, after: str, n: int) -> list[str]:
    return utc(next_slots(expr, tz, z(after), n))


# --- grammar ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("0 9 * * MON", "2026-05-01T00:00", ["2026-05-04T09:00:00", "2026-05-11T09:00:00"]),
        ("0 9 * * mon-fri", "2026-05-01T10:00", ["2026-05-04T09:00:00", "2026-05-05T09:00:00"]),
        ("*/20 * * * *", "2026-05-01T00:00", ["2026-05-01T00:20:00", "2026-05-01T00:40:00", "2026-05-01T01:00:00"]),
        ("5-59/30 8 * * *", "2026-05-01T00:00", ["2026-05-01T08:05:00", "2026-05-01T08:35:00", "2026-05-02T08:05:00"]),
        ("10/20 8 * * *", "2026-05-01T00:00", ["2026-05-01T08:10:00", "2026-05-01T08:30:00", "2026-05-01T08:50:00"]),
        ("0 0,12 1 JAN,jul *", "2026-05-01T00:00", ["2026-07-01T00:00:00", "2026-07-01T12:00:00", "2027-01-01T00:00:00"]),
        ("0 0 * * 7", "2026-05-01T00:00", ["2026-05-03T00:00:00", "2026-05-10T00:00:00"]),  # 7 is Sunday
        ("0 0 * * 0", "2026-05-01T00:00", ["2026-05-03T00:00:00", "2026-05-10T00:00:00"]),
        ("0 0 ? * SUN", "2026-05-01T00:00", ["2026-05-03T00:00:00", "2026-05-10T00:00:00"]),
        ("0 0 29 2 *", "2026-01-01T00:00", ["2028-02-29T00:00:00", "2032-02-29T00:00:00"]),
        ("@hourly", "2026-05-01T00:00", ["2026-05-01T01:00:00", "2026-05-01T02:00:00"]),
        ("@daily", "2026-05-01T00:00", ["2026-05-02T00:00:00", "2026-05-03T00:00:00"]),
        ("@midnight", "2026-05-01T00:00", ["2026-05-02T00:00:00", "2026-05-03T00:00:00"]),
        ("@weekly", "2026-05-01T00:00", ["2026-05-03T00:00:00", "2026-05-10T00:00:00"]),
        ("@monthly", "2026-05-01T00:00", ["2026-06-01T00:00:00", "2026-07-01T00:00:00"]),
        ("@yearly", "2026-05-01T00:00", ["2027-01-01T00:00:00", "2028-01-01T00:00:00"]),
        ("@ANNUALLY", "2026-05-01T00:00", ["2027-01-01T00:00:00", "2028-01-01T00:00:00"]),
    ],
)
def test_cron_forms_fire_when_cron_would(expr: str, after: str, expected: list[str]) -> None:
    assert run(expr, "UTC", after, len(expected)) == expected


def test_six_fields_put_seconds_first() -> None:
    assert run("30 0 9 * * MON", "UTC", "2026-05-04T09:00", 2) == ["2026-05-04T09:00:30", "2026-05-11T09:00:30"]
    assert run("*/15 * * * * *", "UTC", "2026-05-04T09:00", 3) == [
        "2026-05-04T09:00:15", "2026-05-04T09:00:30", "2026-05-04T09:00:45"]


def test_day_of_month_and_day_of_week_both_restricted_match_either() -> None:
    # Friday the 13th in cron means "every 13th, and every Friday"
    assert run("0 0 13 * FRI", "UTC", "2026-01-01T00:00", 5) == [
        "2026-01-02T00:00:00", "2026-01-09T00:00:00", "2026-01-13T00:00:00",
        "2026-01-16T00:00:00", "2026-01-23T00:00:00"]


def test_a_star_day_field_ands_the_days_as_cron_does() -> None:
    # `*/2` starts with `*`, so cron ANDs: odd days that are also Mondays
    assert run("0 0 */2 * MON", "UTC", "2026-05-31T00:00", 3) == [
        "2026-06-01T00:00:00", "2026-06-15T00:00:00", "2026-06-29T00:00:00"]


def test_slots_are_strictly_after_and_keep_the_time_zone_out_of_utc_crons() -> None:
    assert run("0 9 * * *", "UTC", "2026-05-04T09:00", 1) == ["2026-05-05T09:00:00"]
    assert run("0 9 * * *", "UTC", "2026-05-04T08:59:59.999999", 1) == ["2026-05-04T09:00:00"]
    first = Schedule.parse("0 9 * * *").next_slot(z("2026-05-04T10:00"), "Europe/Berlin")
    assert first == z("2026-05-05T07:00") and first.tzinfo is UTC


def test_after_in_another_offset_is_the_same_instant() -> None:
    plus2 = datetime(2026, 5, 4, 11, 0, tzinfo=timezone(timedelta(hours=2)))  # 09:00Z
    assert Schedule.parse("0 9 * * *").next_slot(plus2) == z("2026-05-05T09:00")


def test_every_is_anchored_at_the_epoch_so_all_nodes_agree() -> None:
    s = Schedule.parse("@every 90s")
    slots = list(islice(s.slots(z("2026-05-04T10:00:01")), 3))
    assert utc(slots) == ["2026-05-04T10:01:30", "2026-05-04T10:03:00", "2026-05-04T10:04:30"]
    for slot in slots:
        assert (slot - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() % 90 == 0
    # the same slot whatever `after` the caller had, and whatever zone the job names
    assert s.next_slot(z("2026-05-04T10:00:00.5")) == s.next_slot(z("2026-05-04T10:01:29"), "Asia/Kolkata")
    assert s.next_slot(z("2026-05-04T10:01:30")) == z("2026-05-04T10:03:00")
    assert s.interval == timedelta(seconds=90)


def test_every_keeps_real_elapsed_time_through_dst() -> None:
    slots = next_slots("@every 1h", "America/New_York", z("2026-11-01T04:00"), 4)
    assert utc(slots) == ["2026-11-01T05:00:00", "2026-11-01T06:00:00", "2026-11-01T07:00:00", "2026-11-01T08:00:00"]


def test_once_is_one_slot_at_its_instant() -> None:
    s = Schedule.parse("@once 2026-05-15T10:00Z")
    assert s.is_once and s.once_at == z("2026-05-15T10:00")
    assert list(s.slots(z("2026-01-01T00:00"), "Europe/Berlin")) == [z("2026-05-15T10:00")]
    assert list(s.slots(z("2026-05-15T10:00"))) == []
    assert s.next_slot(z("2026-06-01T00:00")) is None
    assert Schedule.parse("@once 2026-05-15T12:00+02:00").once_at == z("2026-05-15T10:00")


def test_once_in_the_past_is_refused_at_creation() -> None:
    s = Schedule.parse("@once 2026-05-15T10:00Z")
    s.check_future(z("2026-05-15T09:59"))
    with pytest.raises(ScheduleError, match="in the past") as e:
        s.check_future(z("2026-05-15T10:00"))
    assert e.value.field == "schedule"
    Schedule.parse("0 9 * * *").check_future(z("2030-01-01T00:00"))  # only @once has an end


def test_expr_keeps_the_users_text_with_whitespace_normalised() -> None:
    s = Schedule.parse("  0   9 *\t* MON ")
    assert s.expr == "0 9 * * MON"
    assert s == Schedule.parse("0 9 * * MON") and hash(s) == hash(Schedule.parse("0 9 * * MON"))
    assert Schedule.parse("@every   90s").expr == "@every 90s"
    assert s.fixed_time and not Schedule.parse("@hourly").fixed_time and Schedule.parse("@daily").fixed_time


def test_a_naive_after_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="naive"):
        Schedule.parse("@daily").next_slot(datetime(2026, 1, 1))


def test_unknown_zone_is_a_timezone_error_before_any_slot() -> None:
    for expr in ("0 9 * * *", "@every 1m", "@once 2026-05-15T10:00Z"):
        with pytest.raises(ScheduleError, match="unknown time zone 'Mars/Olympus'") as e:
            Schedule.parse(expr).slots(z("2026-01-01T00:00"), "Mars/Olympus")
        assert e.value.field == "timezone"


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("61 * * * *", "'61 * * * *': minute 61 is out of range 0-59"),
        ("0 24 * * *", "hour 24 is out of range 0-23"),
        ("0 0 0 * *", "day-of-month 0 is out of range 1-31"),
        ("0 0 * 13 *", "month 13 is out of range 1-12"),
        ("0 0 * * 8", "day-of-week 8 is out of range 0-7"),
        ("60 0 0 * * *", "second 60 is out of range 0-59"),
        ("0 0 * * MOX", "day-of-week 'MOX' is not a name or number; use SUN-SAT or 0-7"),
        ("0 0 * FOO *", "month 'FOO' is not a name or number; use JAN-DEC or 1-12"),
        ("x * * * *", "minute 'x' is not a number; use 0-59"),
        ("* * *", "has 5 fields (minute hour day-of-month month day-of-week) or 6 with seconds first, not 3"),
        ("0 0 0 1 1 * 2026", "a 7th (year) field is not supported"),
        ("5-2 * * * *", "minute range 5-2 runs backwards; write the smaller value first, or split it, e.g. '5-59,0-2'"),
        ("0 0 * * FRI-MON", "e.g. 'FRI-SAT,SUN-MON'"),
        ("*/0 * * * *", "minute step '0' must be a whole number of at least 1"),
        ("*/x * * * *", "minute step 'x' must be a whole number"),
        ("*/90 * * * *", "minute step 90 leaves only one minute in 0-59; write that value, or '@every'"),
        ("1,,2 * * * *", "minute '' is not valid"),
        ("? * * * *", "'?' is only allowed in the day fields"),
        ("0 0 L * *", "day-of-month 'L' (Quartz L, W or #) is not supported"),
        ("0 0 * * 5#3", "day-of-week '5#3' (Quartz L, W or #) is not supported"),
        ("0 0 30 2 *", "'0 0 30 2 *': never fires: day 30 does not occur in February"),
        ("0 0 31 APR,JUN *", "never fires: day 31 does not occur in April, June"),
        ("", "the schedule is empty; write one, e.g. '0 9 * * MON'"),
        ("   ", "the schedule is empty"),
        ("@reboot", "@reboot is not a schedule; use a cron expression, @hourly, @daily"),
        ("@daily 9", "@daily takes no argument; write just '@daily'"),
        ("@every", "@every needs an interval, e.g. '@every 5m'"),
        ("@every 5x", "'5x' is not a duration; write e.g. '@every 45s'"),
        ("@every 500ms", "the interval must be at least 1s"),
        ("@every 0s", "the interval must be at least 1s"),
        ("@once", "@once needs an instant, e.g. '@once 2026-05-15T10:00Z'"),
        ("@once tomorrow", "'tomorrow' is not an ISO-8601 instant"),
        ("@once 2026-05-15T10:00", "the instant has no UTC offset; add 'Z' or an offset"),
        ("@once 2026-05-15", "the instant has no UTC offset"),
    ],
)
def test_bad_schedules_say_what_is_wrong_and_what_to_write(expr: str, message: str) -> None:
    with pytest.raises(ScheduleError) as e:
        Schedule.parse(expr)
    assert message in e.value.message
    assert e.value.field == "schedule"
    assert "\n" not in str(e.value)


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ScheduleError, match="out of range"):
        Schedule("61 * * * *")


# --- DST: fixed-time jobs (cronie: once per day, whatever the clock does) ---------------------


def test_fixed_time_in_a_skipped_hour_runs_once_right_after_the_jump() -> None:
    assert run("30 2 * * *", "America/New_York", "2026-03-07T00:00", 3) == [
        "2026-03-07T07:30:00",  # 02:30 EST
        "2026-03-08T07:00:00",  # 02:30 does not exist: 03:00 EDT, the first instant after the jump
        "2026-03-09T06:30:00",  # 02:30 EDT
    ]


def test_several_skipped_times_collapse_into_one_slot() -> None:
    assert run("0,15,30,45 2 * * *", "America/New_York", "2026-03-08T06:00", 2) == [
        "2026-03-08T07:00:00", "2026-03-09T06:00:00"]
    # a listed time that exists right after the jump (03:00) is the same slot, not a second one
    assert run("0 2,3 * * *", "America/New_York", "2026-03-08T06:00", 2) == [
        "2026-03-08T07:00:00", "2026-03-09T06:00:00"]


def test_fixed_time_in_a_repeated_hour_runs_once_on_the_first_pass() -> None:
    # croniter 7.0 runs this one twice on 2026-11-01
    assert run("30 1 * * *", "America/New_York", "2026-10-31T00:00", 3) == [
        "2026-10-31T05:30:00",  # 01:30 EDT
        "2026-11-01T05:30:00",  # 01:30 EDT, the first pass; not again at 06:30Z (01:30 EST)
        "2026-11-02T06:30:00",  # 01:30 EST
    ]
    # asked from inside the second pass, the day's run is already behind us
    assert run("30 1 * * *", "America/New_York", "2026-11-01T06:15", 1) == ["2026-11-02T06:30:00"]


def test_fixed_time_in_berlin() -> None:
    assert run("30 2 * * *", "Europe/Berlin", "2026-03-28T00:00", 3) == [
        "2026-03-28T01:30:00", "2026-03-29T01:00:00", "2026-03-30T00:30:00"]
    assert run("30 2 * * *", "Europe/Berlin", "2026-10-24T00:00", 3) == [
        "2026-10-24T00:30:00", "2026-10-25T00:30:00", "2026-10-26T01:30:00"]


def test_fixed_time_with_a_30_minute_shift_lord_howe() -> None:
    # spring: 02:00 -> 02:30, so 02:15 does not exist and runs as the clock lands (15:30Z)
    assert run("15 2 * * *", "Australia/Lord_Howe", "2026-10-02T00:00", 3) == [
        "2026-10-02T15:45:00", "2026-10-03T15:30:00", "2026-10-04T15:15:00"]
    # fall back: 02:00 -> 01:30, so 01:45 happens twice and runs on the first pass only
    assert run("45 1 * * *", "Australia/Lord_Howe", "2026-04-03T00:00", 3) == [
        "2026-04-03T14:45:00", "2026-04-04T14:45:00", "2026-04-05T15:15:00"]


def test_fixed_time_in_the_southern_hemisphere() -> None:
    # Sydney springs forward in October, 02:00 -> 03:00
    assert run("30 2 * * *", "Australia/Sydney", "2026-10-02T00:00", 3) == [
        "2026-10-02T16:30:00", "2026-10-03T16:00:00", "2026-10-04T15:30:00"]
    # and falls back in April, 03:00 -> 02:00
    assert run("30 2 * * *", "Australia/Sydney", "2026-04-03T00:00", 3) == [
        "2026-04-03T15:30:00", "2026-04-04T15:30:00", "2026-04-05T16:30:00"]
    # Santiago skips midnight itself: a daily job runs at 01:00, the day is not lost
    assert run("@daily", "America/Santiago", "2026-09-04T00:00", 3) == [
        "2026-09-04T04:00:00", "2026-09-05T04:00:00", "2026-09-06T04:00:00"]


# --- DST: wildcard jobs (real elapsed time) --------------------------------------------------


def test_wildcard_runs_in_both_passes_of_a_repeated_hour_in_utc_order() -> None:
    slots = run("*/30 * * * *", "America/New_York", "2026-11-01T04:00", 6)
    assert slots == [
        "2026-11-01T04:30:00",  # 00:30 EDT
        "2026-11-01T05:00:00",  # 01:00 EDT
        "2026-11-01T05:30:00",  # 01:30 EDT
        "2026-11-01T06:00:00",  # 01:00 EST
        "2026-11-01T06:30:00",  # 01:30 EST
        "2026-11-01T07:00:00",  # 02:00 EST
    ]


def test_wildcard_resumed_inside_a_repeated_hour_sees_the_second_pass() -> None:
    # 05:45Z reads 01:45 EDT; the next slots read 01:00 and 01:30 again, an hour later
    assert run("*/30 * * * *", "America/New_York", "2026-11-01T05:45", 2) == [
        "2026-11-01T06:00:00", "2026-11-01T06:30:00"]
    assert run("*/30 * * * *", "America/New_York", "2026-11-01T06:15", 2) == [
        "2026-11-01T06:30:00", "2026-11-01T07:00:00"]


def test_wildcard_has_no_slots_in_a_skipped_hour() -> None:
    assert run("*/30 * * * *", "America/New_York", "2026-03-08T05:45", 4) == [
        "2026-03-08T06:00:00", "2026-03-08T06:30:00", "2026-03-08T07:00:00", "2026-03-08T07:30:00"]
    assert run("@hourly", "Europe/London", "2026-03-29T00:00", 2) == ["2026-03-29T01:00:00", "2026-03-29T02:00:00"]
    assert run("0 * * * *", "Europe/London", "2026-10-25T00:00", 3) == [
        "2026-10-25T01:00:00", "2026-10-25T02:00:00", "2026-10-25T03:00:00"]


def test_wildcard_with_a_30_minute_shift_lord_howe() -> None:
    assert run("*/30 * * * *", "Australia/Lord_Howe", "2026-04-04T13:45", 5) == [
        "2026-04-04T14:00:00",  # 01:00 +11
        "2026-04-04T14:30:00",  # 01:30 +11
        "2026-04-04T15:00:00",  # 01:30 +10:30, the second pass
        "2026-04-04T15:30:00",  # 02:00 +10:30
        "2026-04-04T16:00:00",
    ]
    assert run("*/30 * * * *", "Australia/Lord_Howe", "2026-10-03T14:45", 3) == [
        "2026-10-03T15:00:00",  # 01:30 +10:30; 02:00 does not exist
        "2026-10-03T15:30:00",  # 02:30 +11
        "2026-10-03T16:00:00",
    ]


def test_wildcard_minute_under_a_fixed_hour_follows_elapsed_time() -> None:
    assert run("*/20 1 * * *", "America/New_York", "2026-11-01T04:00", 6) == [
        "2026-11-01T05:00:00", "2026-11-01T05:20:00", "2026-11-01T05:40:00",
        "2026-11-01T06:00:00", "2026-11-01T06:20:00", "2026-11-01T06:40:00"]


# --- against independent oracles ------------------------------------------------------------


#: expression -> (wall-clock predicate, fixed-time?) for a minute-by-minute brute force
ORACLE = {
    "*/30 * * * *": (lambda t: t.minute % 30 == 0, False),
    "0 * * * *": (lambda t: t.minute == 0, False),
    "*/15 0-3 * * *": (lambda t: t.minute % 15 == 0 and t.hour <= 3, False),
    "30 2 * * *": (lambda t: (t.hour, t.minute) == (2, 30), True),
    "0,30 1,2 * * *": (lambda t: t.minute in (0, 30) and t.hour in (1, 2), True),
    "15 0-3 * * *": (lambda t: t.minute == 15 and t.hour <= 3, True),
    "0 0 * * *": (lambda t: (t.hour, t.minute) == (0, 0), True),
}
TRANSITIONS = [
    ("America/New_York", "2026-03-08T07:00"), ("America/New_York", "2026-11-01T06:00"),
    ("Europe/London", "2026-03-29T01:00"), ("Europe/Berlin", "2026-10-25T01:00"),
    ("Australia/Lord_Howe", "2026-10-03T15:30"), ("Australia/Lord_Howe", "2026-04-04T15:00"),
    ("Australia/Sydney", "2026-10-03T16:00"), ("America/Santiago", "2026-09-06T04:00"),
    ("America/Santiago", "2026-04-05T03:00"), ("Asia/Kolkata", "2026-03-08T07:00"),
]


def brute_force(expr: str, tz: str, start: datetime, end: datetime) -> list[datetime]:
    """Slots in (start, end] by walking every UTC minute: what invariant 3 says, spelled out."""
    matches, fixed = ORACLE[expr]
    zone = ZoneInfo(tz)
    out: list[datetime] = []
    seen_days: set[tuple[object, ...]] = set()
    t = start + timedelta(minutes=1)
    while t <= end:
        local = t.astimezone(zone)
        before = (t - timedelta(minutes=1)).astimezone(zone)
        if fixed and local.utcoffset() > before.utcoffset():  # type: ignore[operator]
            # the clock jumped forward at t: a fixed-time job runs here for any skipped match
            wall = before.replace(tzinfo=None) + timedelta(minutes=1)
            while wall < local.replace(tzinfo=None):
                if matches(wall):
                    out.append(t)
                    break
                wall += timedelta(minutes=1)
        if matches(local):
            key = (local.date(), local.hour, local.minute)
            if not (fixed and key in seen_days):  # fixed-time: a repeated wall time runs once
                if not out or out[-1] != t:
                    out.append(t)
            seen_days.add(key)
        t += timedelta(minutes=1)
    return out


@pytest.mark.parametrize(("tz", "moment"), TRANSITIONS)
@pytest.mark.parametrize("expr", list(ORACLE))
def test_slots_match_a_minute_by_minute_walk_around_transitions(expr: str, tz: str, moment: str) -> None:
    start, end = z(moment) - timedelta(hours=30), z(moment) + timedelta(hours=30)
    expected = brute_force(expr, tz, start, end)
    got = []
    for slot in Schedule.parse(expr).slots(start, tz):
        if slot > end:
            break
        got.append(slot)
    assert utc(got) == utc(expected)


def test_utc_slots_agree_with_croniter_for_random_expressions() -> None:
    # croniter is right when there is no DST; it serves as an oracle for the matcher
    rng = random.Random(20260501)
    pool = {
        "minute": ["*", "*/7", "0", "5,35", "10-20", "10-40/15", "59"],
        "hour": ["*", "*/5", "0", "9", "1-3,22", "23"],
        "dom": ["*", "1", "15", "28-31", "1,10,20"],
        "month": ["*", "2", "FEB", "1-3", "*/4", "DEC"],
        "dow": ["*", "MON", "1-5", "SAT,SUN", "0", "5"],
    }
    start = z("2026-01-01T00:00")
    for _ in range(150):
        expr = " ".join(rng.choice(pool[f]) for f in pool)
        ours = list(islice(Schedule.parse(expr).slots(start), 8))
        it = croniter(expr, start)
        theirs = [it.get_next(datetime) for _ in range(8)]
        assert ours == theirs, expr
