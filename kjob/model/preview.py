"""Previewing a schedule's next slots: one function behind `kjob next` (no server) and
`GET /v1/schedules/preview`, so both read the same input the same way. Pure: `now` is passed in."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from kjob.errors import InvalidInput
from kjob.model.schedule import next_slots, zone

MAX_PREVIEW = 100


def parse_instant(text: str, tz: str, field: str = "after") -> datetime:
    """An ISO-8601 instant. With `Z` or an offset it is taken as written; without one it is a
    wall-clock time in zone `tz` (so `--after 2026-03-07T00:00` means midnight in `--tz`).

    :raises InvalidInput: (field `field`) not ISO-8601; (field `tz`) unknown zone.
    """
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(
            f"{text!r} is not an ISO-8601 instant; write e.g. '2026-03-07T00:00:00Z' or '2026-03-07T09:00'",
            field,
        ) from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        moment = moment.replace(tzinfo=_zone(tz))
    return moment


def preview(schedule: str, tz: str, after: str | datetime | None, n: int, *, now: datetime) -> list[datetime]:
    """The first `n` (1..100) slots of `schedule` in zone `tz` strictly after `after` (default
    `now`), as aware UTC datetimes. Fewer when the schedule ends (a `@once`).

    :raises InvalidInput: field `schedule` (bad expression), `tz` (unknown zone), `after`
        (not an instant) or `n` (out of range).
    """
    if not 1 <= n <= MAX_PREVIEW:
        raise InvalidInput(f"n must be between 1 and {MAX_PREVIEW}, not {n}", "n")
    _zone(tz)
    start = parse_instant(after, tz) if isinstance(after, str) else (after or now)
    return next_slots(schedule, tz, start, n)


def _zone(tz: str) -> ZoneInfo:
    try:
        return zone(tz)
    except InvalidInput as e:
        raise InvalidInput(e.message, "tz") from None
