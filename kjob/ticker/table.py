"""The ticker's jobs in memory, compact enough for 1,000,000 of them in one process.

A job is a row number into parallel columns (lists of shared objects, arrays of floats), not
an object of its own: a dataclass per job, a heap tuple per job and a datetime per job cost
about 1 KB each, the columns some 250 bytes. Strings that repeat (tenant, zone) and parsed
schedules are shared between jobs.

Due jobs are found by fire time: a heap of the distinct fire instants, and for each instant
the rows due then (an array of row numbers). A herd of 10,000 jobs due on one second is one
heap entry. A row is in a bucket only while its fire time is that instant: a job that changed
or went stays in its old bucket until it is popped, and is skipped then (no search, no
version counter).

Pure: no I/O, no clock (callers pass the time).
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import NamedTuple
from uuid import UUID

from kjob.model.schedule import Schedule

NONE = math.nan  # a job without a next slot (a `@once` that fired)


def to_ts(moment: datetime) -> float:
    return moment.timestamp()


def from_ts(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Due(NamedTuple):
    """One job's slot that is due: what the ticker writes and publishes."""

    job_id: UUID
    tenant: str
    slug: str
    slot: datetime
    fire_ts: float


class JobTable:
    def __init__(self) -> None:
        self._row: dict[UUID, int] = {}
        self._ids: list[UUID | None] = []
        self._tenant: list[str] = []
        self._slug: list[str] = []
        self._schedule: list[Schedule | None] = []
        self._tz: list[str] = []
        self._version: array = array("q")
        self._jitter: array = array("d")  # seconds
        self._next: array = array("d")  # the next slot to fire (epoch seconds), NONE if none
        self._fire: array = array("d")  # when it fires: the slot plus its jitter
        self._free: list[int] = []
        self._rows = 0  # rows ever used (the columns may be longer)
        self._shared: dict[str, str] = {}
        self._heap: list[float] = []
        self._buckets: dict[float, array] = {}

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, job_id: UUID) -> bool:
        return job_id in self._row

    def ids(self) -> Iterator[UUID]:
        return iter(list(self._row))

    def _share(self, text: str) -> str:
        return self._shared.setdefault(text, text)

    # -- one job ---------------------------------------------------------------------------

    def put(self, job_id: UUID, tenant: str, slug: str, schedule: Schedule, tz: str, version: int,
            jitter: timedelta, next_slot: datetime | None, fire_at: datetime | None) -> None:
        """Add or replace the job; it fires `next_slot` at `fire_at` (None: never again)."""
        if next_slot is None or fire_at is None:
            self.put_ts(job_id, tenant, slug, schedule, tz, version, jitter, NONE, NONE)
        else:
            self.put_ts(job_id, tenant, slug, schedule, tz, version, jitter, to_ts(next_slot), to_ts(fire_at))

    def put_ts(self, job_id: UUID, tenant: str, slug: str, schedule: Schedule, tz: str, version: int,
               jitter: timedelta, next_ts: float, fire_ts: float) -> None:
        """`put` with the slot and its fire time as epoch seconds (NONE: never again): the
        load computes them once for every job that shares a schedule and a resume point."""
        row = self._row.get(job_id)
        if row is None:
            row = self._free.pop() if self._free else self._grow()
            self._row[job_id] = row
            self._ids[row] = job_id
        self._tenant[row], self._slug[row] = self._share(tenant), slug
        self._schedule[row], self._tz[row] = schedule, self._share(tz)
        self._version[row], self._jitter[row] = version, jitter.total_seconds()
        self._set_next_ts(row, next_ts, fire_ts)

    def _grow(self) -> int:
        """A new row. The columns grow by a quarter at a time: nine appends per job were a
        tenth of loading 1,000,000."""
        if self._rows == len(self._ids):
            more = max(1024, self._rows // 4)
            for column in (self._ids, self._tenant, self._slug, self._schedule, self._tz):
                column.extend([None] * more)  # type: ignore[list-item]
            for numbers in (self._version, self._jitter, self._next, self._fire):
                numbers.frombytes(bytes(numbers.itemsize * more))
        self._rows += 1
        return self._rows - 1

    def _set_next(self, row: int, next_slot: datetime | None, fire_at: datetime | None) -> None:
        if next_slot is None or fire_at is None:
            self._set_next_ts(row, NONE, NONE)
        else:
            self._set_next_ts(row, to_ts(next_slot), to_ts(fire_at))

    def _set_next_ts(self, row: int, next_ts: float, ts: float) -> None:
        self._next[row], self._fire[row] = next_ts, ts
        if math.isnan(ts):
            return
        bucket = self._buckets.get(ts)
        if bucket is None:
            bucket = self._buckets[ts] = array("q")
            heapq.heappush(self._heap, ts)
        bucket.append(row)

    def drop(self, job_id: UUID) -> bool:
        row = self._row.pop(job_id, None)
        if row is None:
            return False
        self._ids[row] = self._schedule[row] = None
        self._slug[row] = ""
        self._next[row] = self._fire[row] = NONE
        self._free.append(row)
        return True

    def get(self, job_id: UUID) -> "Entry | None":
        row = self._row.get(job_id)
        if row is None:
            return None
        return Entry(self._tenant[row], self._slug[row], self._schedule[row], self._tz[row],  # type: ignore[arg-type]
                     self._version[row], timedelta(seconds=self._jitter[row]),
                     None if math.isnan(self._next[row]) else from_ts(self._next[row]))

    def set_names(self, job_id: UUID, tenant: str, slug: str, version: int) -> None:
        row = self._row[job_id]
        self._tenant[row], self._slug[row], self._version[row] = self._share(tenant), slug, version

    def version_of(self, job_id: UUID) -> int | None:
        row = self._row.get(job_id)
        return None if row is None else self._version[row]

    # -- due jobs ----------------------------------------------------------------------------

    def next_fire(self) -> float | None:
        """The earliest fire instant queued (epoch seconds), or None. It may be stale (every
        job of its bucket changed): popping it then finds nothing."""
        return self._heap[0] if self._heap else None

    def pop_due(self, until_ts: float, limit: int, advance, on_error) -> list[Due]:
        """Up to `limit` slots firing at or before `until_ts`, earliest first. Each job is
        moved on to its next slot by `advance(job_id, schedule, tz, jitter, slot) ->
        (next_slot, fire_at)`, which may raise: the job is then left out (dropped), and
        `on_error(job_id, "tenant/slug", err)` told."""
        out: list[Due] = []
        while self._heap and self._heap[0] <= until_ts and len(out) < limit:
            ts = self._heap[0]
            bucket = self._buckets[ts]
            take = min(len(bucket), limit - len(out))
            rows, rest = bucket[:take], bucket[take:]
            if rest:
                self._buckets[ts] = rest
            else:
                heapq.heappop(self._heap)
                del self._buckets[ts]
            for row in rows:
                if self._fire[row] != ts:  # changed, dropped, or a second copy: not due now
                    continue
                job_id = self._ids[row]
                assert job_id is not None
                slot = from_ts(self._next[row])
                out.append(Due(job_id, self._tenant[row], self._slug[row], slot, ts))
                schedule, tz = self._schedule[row], self._tz[row]
                try:
                    next_slot, fire_at = advance(job_id, schedule, tz, timedelta(seconds=self._jitter[row]), slot)
                except Exception as err:
                    name = f"{self._tenant[row]}/{self._slug[row]}"
                    self.drop(job_id)
                    on_error(job_id, name, err)
                    continue
                self._set_next(row, next_slot, fire_at)
        return out


class Entry(NamedTuple):
    """One job as the table holds it (for reconciling with the store)."""

    tenant: str
    slug: str
    schedule: Schedule
    tz: str
    version: int
    jitter: timedelta
    next_slot: datetime | None
