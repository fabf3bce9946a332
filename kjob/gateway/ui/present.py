"""What the dashboard's pages show, computed from API views: a schedule in words, durations,
times in a zone, outcome strips, failure streaks and the jobs-list filters. Pure: no I/O, so
tests/dashboard/test_present.py checks it without servers."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal
from zoneinfo import ZoneInfo

from kjob.model.run import FINAL_STATUSES, RunStatus
from kjob.model.schedule import MACROS, Schedule

_DAY_NAMES = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_DAY_ABBR = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_MONTH_ABBR = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")

#: Statuses a failure streak counts: the run finished and did not succeed.
FAILED = frozenset({RunStatus.failed, RunStatus.timed_out, RunStatus.error, RunStatus.lost})
#: Statuses that never ran, whose reason the job page lists.
NOT_RUN = frozenset({RunStatus.missed, RunStatus.skipped})

#: Outcomes in a job's strip (and in the jobs list's counts).
STRIP = 20

JobFilter = Literal["all", "enabled", "paused", "failing"]
JobSort = Literal["slug", "next", "last"]


def plural(n: int | float, word: str) -> str:
    n = int(n) if float(n).is_integer() else n
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def duration_words(seconds: float | None) -> str:
    """`1.2 s`, `3 min 4 s`, `2 h 5 min`; an empty string for None."""
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def _interval_words(delta: timedelta) -> str:
    total = int(delta.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if total % size == 0 and total >= size:
            count = total // size
            return f"every {unit}" if count == 1 else f"every {count} {unit}s"
    return "every second" if total == 1 else f"every {total} seconds"


def _names(field: str, names: Sequence[str], full: Sequence[str] | None = None) -> list[str] | None:
    """A comma list of plain values or names (`MON,FRI`, `1,15`) as words; None if not plain."""
    out = []
    for item in field.split(","):
        upper = item.upper()
        if upper in names:
            index = names.index(upper)
        elif item.isdigit():
            index = int(item) % 7 if full is not None else int(item)
        else:
            return None
        out.append(full[index] if full is not None else str(index))
    return out


def _every_n(field: str, unit: str) -> str | None:
    if field == "*":
        return f"every {unit}"
    match = re.fullmatch(r"\*/(\d+)", field)
    if match:
        n = int(match.group(1))
        return f"every {unit}" if n == 1 else f"every {n} {unit}s"
    return None


def schedule_words(expr: str) -> str:
    """A schedule in words, for people; the cron text is always shown beside it.

    Common shapes get a sentence ("every 5 minutes", "at 09:00 on Monday", "every 90 seconds");
    anything else reads "as the cron expression says", never a wrong guess.
    """
    schedule = Schedule.parse(expr)
    if schedule.once_at is not None:
        return "once, at " + schedule.once_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    if schedule.interval is not None:
        return _interval_words(schedule.interval) + " (counted in UTC)"
    text = MACROS.get(schedule.expr.lower(), schedule.expr)
    fields = text.split()
    second = "0"
    if len(fields) == 6:
        second, fields = fields[0], fields[1:]
    minute, hour, dom, month, dow = fields
    when: str | None = None
    if second != "0":
        when = _every_n(second, "second") if minute == hour == "*" else None
        if when is None:
            return "as the cron expression says"
    elif hour == "*":
        if minute.isdigit():
            when = "every hour" if minute == "0" else f"every hour at minute {int(minute)}"
        else:
            when = _every_n(minute, "minute")
    elif minute.isdigit() and all(h.isdigit() for h in hour.split(",")):
        when = "at " + ", ".join(f"{int(h):02d}:{int(minute):02d}" for h in hour.split(","))
    if when is None:
        return "as the cron expression says"
    if when.startswith("at ") and dom in ("*", "?") and dow in ("*", "?"):
        when = "every day " + when
    parts = [when]
    if dow not in ("*", "?"):
        days = _names(dow, _DAY_ABBR, _DAY_NAMES)
        if days is None:
            return "as the cron expression says"
        parts.append("on " + ", ".join(days))
    if dom not in ("*", "?"):
        doms = _names(dom, ())
        if doms is None:
            return "as the cron expression says"
        parts.append(("or " if dow not in ("*", "?") else "") + "on day " + ", ".join(doms) + " of the month")
    if month != "*":
        months = _names(month, _MONTH_ABBR)
        if months is None:
            return "as the cron expression says"
        parts.append("in " + ", ".join(_MONTH_ABBR[int(m) - 1].title() if m.isdigit() else m for m in months))
    return " ".join(parts)


def local_text(moment: datetime | None, tz: str) -> str:
    """`2026-12-01 10:00:00 CET` in the job's zone; empty for None."""
    if moment is None:
        return ""
    return moment.astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M:%S %Z")


def utc_short(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def parse_instant(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


@dataclass(frozen=True)
class Outcomes:
    """A job's recent runs, as its row in the jobs list summarises them."""

    #: Statuses of the last runs, oldest first (the strip reads left to right).
    strip: list[str]
    last: str | None
    last_at: datetime | None
    last_success: datetime | None
    last_failure: datetime | None
    succeeded: int
    failed: int
    #: Finished runs in a row, newest first, that did not succeed.
    streak: int


def outcomes(runs: Iterable[dict[str, Any]]) -> Outcomes:
    """Summarise runs given newest slot first (as `GET /v1/jobs/{slug}/runs` answers)."""
    finished = [r for r in runs if RunStatus(r["status"]) in FINAL_STATUSES | {RunStatus.lost}]
    streak = 0
    for r in finished:
        status = RunStatus(r["status"])
        if status in NOT_RUN:
            continue
        if status not in FAILED:
            break
        streak += 1

    def first(statuses: frozenset[RunStatus]) -> datetime | None:
        run = next((r for r in finished if RunStatus(r["status"]) in statuses), None)
        return None if run is None else run["finished_at"] or run["slot"]

    last = finished[0] if finished else None
    return Outcomes(
        strip=[RunStatus(r["status"]).value for r in reversed(finished[:STRIP])],
        last=RunStatus(last["status"]).value if last else None,
        last_at=(last["finished_at"] or last["slot"]) if last else None,
        last_success=first(frozenset({RunStatus.succeeded})),
        last_failure=first(FAILED),
        succeeded=sum(r["status"] == RunStatus.succeeded for r in finished),
        failed=sum(RunStatus(r["status"]) in FAILED for r in finished),
        streak=streak,
    )


def _label_match(labels: dict[str, str], wanted: str) -> bool:
    key, sep, value = wanted.partition("=")
    key, value = key.strip(), value.strip()
    if key not in labels:
        return False
    return not sep or labels[key] == value


def filter_jobs(
    rows: Sequence[tuple[dict[str, Any], Outcomes]],
    *,
    text: str = "",
    status: JobFilter = "all",
    label: str = "",
    sort: JobSort = "slug",
) -> list[tuple[dict[str, Any], Outcomes]]:
    """The jobs-list filters: `text` in the slug, description, agent or prompt (any case);
    `status` enabled, paused or failing (last finished run did not succeed); `label` as
    `key` or `key=value`; sorted by slug, next fire (soonest first, paused last) or last outcome
    (latest first)."""
    needle = text.strip().lower()
    chosen = []
    for job, summary in rows:
        if needle and not any(needle in str(job.get(k, "")).lower() for k in ("slug", "description", "agent", "prompt")):
            continue
        if status == "enabled" and not job["enabled"]:
            continue
        if status == "paused" and job["enabled"]:
            continue
        if status == "failing" and summary.streak == 0:
            continue
        if label.strip() and not _label_match(job.get("labels") or {}, label):
            continue
        chosen.append((job, summary))
    if sort == "next":
        far = "9999"
        chosen.sort(key=lambda row: (row[0].get("next_fire") or far, row[0]["slug"]))
    elif sort == "last":
        chosen.sort(key=lambda row: (row[1].last_at is None, -(row[1].last_at.timestamp() if row[1].last_at else 0),
                                     row[0]["slug"]))
    else:
        chosen.sort(key=lambda row: row[0]["slug"])
    return chosen
