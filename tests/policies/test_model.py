"""The policies' pure parts: jitter maths (including DST days), backfill ranges, the job fields
and their job-file round trip."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from kjob.errors import InvalidInput, JobFileError
from kjob.model.job import parse_job
from kjob.model.jobfile import dump_job, load_jobs
from kjob.model.policies import JITTER_GAP_SHARE, backfill_slots, jitter_for
from kjob.model.schedule import Schedule, next_slots

UTC = timezone.utc
JOB = uuid.UUID("3f0c2a4e-1111-4c5d-9e2f-000000000001")
OTHER_JOB = uuid.UUID("3f0c2a4e-1111-4c5d-9e2f-000000000002")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def delays(expr: str, tz: str, after: str, n: int, jitter: timedelta, job: uuid.UUID = JOB):
    """(slot, delay, next slot) for n slots of a schedule."""
    slots = next_slots(expr, tz, at(after), n + 1)
    return [(s, jitter_for(job, s, jitter, nxt), nxt) for s, nxt in zip(slots, slots[1:])]


def test_jitter_is_the_same_for_a_slot_on_every_call_and_differs_between_slots_and_jobs():
    slots = next_slots("@every 10m", "UTC", at("2026-05-01T00:00Z"), 50)
    first = [jitter_for(JOB, s, timedelta(minutes=2), None) for s in slots]
    again = [jitter_for(JOB, s, timedelta(minutes=2), None) for s in slots]
    other = [jitter_for(OTHER_JOB, s, timedelta(minutes=2), None) for s in slots]
    assert first == again
    assert first != other
    assert len(set(first)) > 40  # spread over the range, not a constant
    assert all(timedelta(0) <= d < timedelta(minutes=2) for d in first)
    assert all(d % timedelta(milliseconds=1) == timedelta(0) for d in first)
    # the same instant written in another zone is the same slot, so the same delay
    local = slots[3].astimezone(timezone(timedelta(hours=5)))
    assert jitter_for(JOB, local, timedelta(minutes=2), None) == first[3]


def test_jitter_never_reaches_the_next_slot():
    for slot, delay, nxt in delays("@every 1s", "UTC", "2026-05-01T00:00Z", 200, timedelta(seconds=30)):
        assert delay < (nxt - slot) * JITTER_GAP_SHARE
        assert slot + delay < nxt


def test_no_jitter_means_no_delay():
    assert jitter_for(JOB, at("2026-05-01T00:00Z"), timedelta(0), at("2026-05-01T00:01Z")) == timedelta(0)


def test_jitter_on_the_spring_forward_day_stays_inside_the_shorter_gap():
    # 02:30 does not exist in New York on 2026-03-08: that slot runs at 03:00 EDT (07:00Z), so
    # the gaps around it are 23.5 h and the cap is half of that, not the 24 h asked for.
    rows = delays("30 2 * * *", "America/New_York", "2026-03-06T12:00Z", 3, timedelta(hours=24))
    assert [s for s, _, _ in rows] == [at("2026-03-07T07:30Z"), at("2026-03-08T07:00Z"), at("2026-03-09T06:30Z")]
    assert [nxt - slot for slot, _, nxt in rows] == [timedelta(hours=23, minutes=30)] * 2 + [timedelta(hours=24)]
    for slot, delay, nxt in rows:
        assert delay < (nxt - slot) / 2
        assert slot + delay < nxt


def test_jitter_on_the_fall_back_day_uses_real_time_and_keeps_the_repeated_hour_apart():
    # A daily 01:30 job runs once on 2026-11-01 (05:30Z) and next at 01:30 EST (06:30Z on the
    # 2nd): a 25 h gap. An hourly (wildcard) job runs at both 01:00s, an hour of real time apart.
    daily = delays("30 1 * * *", "America/New_York", "2026-10-31T12:00Z", 2, timedelta(hours=24))
    assert [s for s, _, _ in daily] == [at("2026-11-01T05:30Z"), at("2026-11-02T06:30Z")]
    assert daily[0][2] - daily[0][0] == timedelta(hours=25)
    assert daily[0][1] < timedelta(hours=12, minutes=30)
    hourly = delays("0 * * * *", "America/New_York", "2026-11-01T04:30Z", 3, timedelta(hours=2))
    assert [s for s, _, _ in hourly] == [at("2026-11-01T05:00Z"), at("2026-11-01T06:00Z"), at("2026-11-01T07:00Z")]
    for slot, delay, nxt in hourly:
        assert delay < timedelta(minutes=30) and slot + delay < nxt


def test_a_one_shot_job_is_delayed_by_at_most_its_jitter():
    slot = at("2027-01-01T00:00Z")
    assert timedelta(0) <= jitter_for(JOB, slot, timedelta(seconds=30), None) < timedelta(seconds=30)


NOW = at("2026-11-26T12:00Z")


def test_backfill_takes_the_slots_of_the_range_with_both_ends_included():
    slots = backfill_slots(Schedule.parse("0 * * * *"), "UTC", at("2026-11-26T06:00Z"), at("2026-11-26T09:00Z"), NOW)
    assert slots == [at(f"2026-11-26T0{h}:00Z") for h in (6, 7, 8, 9)]


def test_backfill_over_a_dst_day_uses_the_jobs_zone():
    slots = backfill_slots(Schedule.parse("30 2 * * *"), "America/New_York", at("2026-03-07T00:00Z"),
                           at("2026-03-09T23:00Z"), NOW)
    assert slots == [at("2026-03-07T07:30Z"), at("2026-03-08T07:00Z"), at("2026-03-09T06:30Z")]


@pytest.mark.parametrize(
    ("start", "end", "field", "words"),
    [
        ("2026-11-26T08:00Z", "2026-11-26T06:00Z", "from", "before"),
        ("2026-11-26T06:00Z", "2026-11-26T06:00Z", "from", "before"),
        ("2026-11-26T06:00Z", "2026-11-27T06:00Z", "to", "future"),
        ("2026-11-26T06:00", "2026-11-26T08:00Z", "from", "offset"),
        ("2026-11-26T06:00Z", "2026-11-26T08:00", "to", "offset"),
    ],
)
def test_a_bad_backfill_range_names_its_end(start, end, field, words):
    with pytest.raises(InvalidInput) as err:
        backfill_slots(Schedule.parse("0 * * * *"), "UTC", datetime.fromisoformat(start.replace("Z", "+00:00")),
                       datetime.fromisoformat(end.replace("Z", "+00:00")), NOW)
    assert err.value.field == field and words in err.value.message


def test_a_backfill_over_the_slot_limit_is_refused():
    with pytest.raises(InvalidInput) as err:
        backfill_slots(Schedule.parse("@every 1s"), "UTC", at("2026-11-26T06:00Z"), at("2026-11-26T07:00Z"), NOW)
    assert err.value.field == "to" and "more than 1000 slots" in err.value.message
    assert len(backfill_slots(Schedule.parse("@every 1s"), "UTC", at("2026-11-26T06:00Z"),
                              at("2026-11-26T06:16:39Z"), NOW)) == 1000


BASE = {"slug": "nightly", "prompt": "echo hi", "agent": "shell", "schedule": "0 3 * * *"}

#: Each bad policy value, and the field its error must name.
BAD_POLICIES = [
    ({"overlap": "sometimes"}, "overlap"),
    ({"overlap": ""}, "overlap"),
    ({"jitter": "30 seconds"}, "jitter"),
    ({"jitter": "25h"}, "jitter"),
    ({"catchup": {"window": "an hour"}}, "catchup.window"),
    ({"catchup": {"policy": "some"}}, "catchup.policy"),
    ({"catchup": {"windw": "1h"}}, "catchup.windw"),
    ({"pause_after_failures": 0}, "pause_after_failures"),
    ({"pause_after_failures": "three"}, "pause_after_failures"),
    ({"history": {"keep_runs": 0}}, "history.keep_runs"),
    ({"history": {"keep_days": -1}}, "history.keep_days"),
    ({"history": {"keep": 10}}, "history.keep"),
]


@pytest.mark.parametrize(("change", "field"), BAD_POLICIES)
def test_each_bad_policy_value_is_refused_naming_its_field(change, field):
    with pytest.raises(InvalidInput) as err:
        parse_job({**BASE, **change})
    assert err.value.field == field


@pytest.mark.parametrize(("change", "field"), BAD_POLICIES[:3])
def test_a_job_file_with_a_bad_policy_names_the_field_in_the_file(change, field):
    key, value = next(iter(change.items()))
    text = dump_job(parse_job(BASE)) + f"{key} = {value!r}\n".replace("'", '"')
    with pytest.raises(JobFileError) as err:
        load_jobs(text)
    assert err.value.field == f"job.{field}"


def test_policies_have_their_defaults_and_round_trip_through_a_job_file():
    plain = parse_job(BASE)
    assert (plain.overlap, plain.jitter, plain.pause_after_failures) == ("skip", timedelta(0), None)
    assert (plain.catchup.window, plain.catchup.policy) == (timedelta(hours=1), "latest")
    assert (plain.history.keep_runs, plain.history.keep_days) == (None, None)
    assert "overlap" not in dump_job(plain)  # defaults are left out of the file

    spec = parse_job({**BASE, "overlap": "queue", "jitter": "1m30s", "catchup": {"window": "6h", "policy": "all"},
                      "pause_after_failures": 3, "history": {"keep_runs": 100, "keep_days": 30}})
    text = dump_job(spec)
    assert 'overlap              = "queue"' in text
    assert 'jitter               = "1m30s"' in text
    assert 'catchup              = { window = "6h", policy = "all" }' in text
    assert "pause_after_failures = 3" in text
    assert "history              = { keep_runs = 100, keep_days = 30 }" in text
    assert load_jobs(text) == [spec]
