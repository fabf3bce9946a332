"""The ticker's jobs in memory (kjob.ticker.table): every job held fires its slot once, at its
instant, in order; a changed, dropped or failing job never fires a stale slot; rows freed are
used again. Sized past the columns' first growth."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from kjob.model.schedule import Schedule
from kjob.ticker.table import JobTable, to_ts

UTC = timezone.utc
T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
EVERY_10S = Schedule.parse("@every 10s")
NO_JITTER = timedelta(0)


def advance(job_id, schedule, tz, jitter, slot):
    nxt = schedule.next_slot(slot, tz)
    return nxt, nxt


def never(job_id, name, err):
    raise AssertionError(f"no job should fail: {name}: {err}")


def fill(table: JobTable, n: int) -> list[uuid.UUID]:
    """n jobs, job i due at T0 + (i mod 7) s."""
    ids = [uuid.uuid4() for _ in range(n)]
    for i, job_id in enumerate(ids):
        slot = T0 + timedelta(seconds=i % 7)
        table.put(job_id, "acme", f"job-{i}", EVERY_10S, "UTC", 1, NO_JITTER, slot, slot)
    return ids


def test_every_job_of_a_large_table_fires_once_in_order_and_moves_on():
    table = JobTable()
    ids = fill(table, 5000)  # past the first growth of the columns (1,024 rows)
    assert len(table) == 5000
    due = table.pop_due(to_ts(T0 + timedelta(seconds=6)), 10_000, advance, never)
    assert sorted(d.job_id for d in due) == sorted(ids)
    assert [d.fire_ts for d in due] == sorted(d.fire_ts for d in due)
    index = {job_id: i for i, job_id in enumerate(ids)}
    for d in due:
        assert (d.tenant, d.slug) == ("acme", f"job-{index[d.job_id]}")
        assert d.slot == T0 + timedelta(seconds=index[d.job_id] % 7)
    # Nothing more until the next slots, ten seconds on; then every job again.
    assert table.pop_due(to_ts(T0 + timedelta(seconds=9)), 10_000, advance, never) == []
    again = table.pop_due(to_ts(T0 + timedelta(seconds=10)), 10_000, advance, never)
    assert sorted(d.job_id for d in again) == sorted(ids)
    assert {d.slot for d in again} == {T0 + timedelta(seconds=10)}  # `@every 10s`: the next tens


def test_limit_leaves_the_rest_of_a_herd_for_the_next_pop():
    table = JobTable()
    ids = fill(table, 3000)
    first = table.pop_due(to_ts(T0), 100, advance, never)
    rest = table.pop_due(to_ts(T0), 10_000, advance, never)
    on_t0 = {job_id for i, job_id in enumerate(ids) if i % 7 == 0}
    assert len(first) == 100
    assert {d.job_id for d in first} | {d.job_id for d in rest} == on_t0
    assert not {d.job_id for d in first} & {d.job_id for d in rest}


def test_a_changed_job_fires_its_new_slot_only_and_a_dropped_one_nothing():
    table = JobTable()
    ids = fill(table, 2000)
    moved, dropped = ids[0], ids[7]  # both due at T0
    later = T0 + timedelta(seconds=3, milliseconds=500)
    table.put(moved, "acme", "job-0", EVERY_10S, "UTC", 2, NO_JITTER, later, later)
    assert table.drop(dropped) and not table.drop(dropped)
    at_t0 = table.pop_due(to_ts(T0), 10_000, advance, never)
    assert moved not in {d.job_id for d in at_t0} and dropped not in {d.job_id for d in at_t0}
    assert table.version_of(moved) == 2 and table.version_of(dropped) is None
    upto = table.pop_due(to_ts(later), 10_000, advance, never)
    assert [d.slot for d in upto if d.job_id == moved] == [later]
    assert dropped not in {d.job_id for d in upto}
    assert len(table) == 1999


def test_rows_freed_are_used_again():
    table = JobTable()
    ids = fill(table, 1500)
    for job_id in ids[:500]:
        table.drop(job_id)
    rows_before = table._rows
    fresh = fill(table, 500)
    assert table._rows == rows_before  # the freed rows, not new ones
    assert len(table) == 1500
    due = table.pop_due(to_ts(T0 + timedelta(seconds=6)), 10_000, advance, never)
    assert sorted(d.job_id for d in due) == sorted(ids[500:] + fresh)


def test_a_job_whose_next_slot_fails_is_dropped_and_reported_the_others_fire():
    table = JobTable()
    ids = fill(table, 1100)
    bad = ids[14]
    failed = []

    def advance_or_fail(job_id, schedule, tz, jitter, slot):
        if job_id == bad:
            raise ValueError("no next slot")
        return advance(job_id, schedule, tz, jitter, slot)

    due = table.pop_due(to_ts(T0 + timedelta(seconds=6)), 10_000, advance_or_fail,
                        lambda job_id, name, err: failed.append((job_id, name, str(err))))
    assert failed == [(bad, "acme/job-14", "no next slot")]
    assert len(due) == 1100  # its slot of now was due and is returned; it has none after
    assert bad not in table
    later = table.pop_due(to_ts(T0 + timedelta(seconds=16)), 10_000, advance, never)
    assert len(later) == 1099 and bad not in {d.job_id for d in later}


@pytest.mark.parametrize("n", [0, 1, 1024, 1025])
def test_sizes_around_a_growth(n):
    table = JobTable()
    ids = fill(table, n)
    assert len(table) == n and all(job_id in table for job_id in ids)
    assert len(table.pop_due(to_ts(T0 + timedelta(seconds=6)), 10_000, advance, never)) == n
