"""Schedules and slot maths. Pure: no I/O, no clock.

A schedule is one of:

- a cron expression: 5 fields `minute hour day-of-month month day-of-week`, or 6 fields with
  SECONDS FIRST (as Quartz, Spring, robfig/cron and NATS do). Fields take numbers, `*`,
  ranges `a-b`, steps `*/n`, `a-b/n` and `a/n`, lists `a,b`, month names `JAN`..`DEC`, day
  names `SUN`..`SAT` (0 and 7 are both Sunday) and `?` for "any" in the two day fields;
- a macro: `@hourly`, `@daily` (= `@midnight`), `@weekly`, `@monthly`, `@yearly` (= `@annually`);
- `@every <duration>`: every interval (>= 1s) counted in UTC from the Unix epoch, so every node
  and every restart agree on the slots;
- `@once <ISO-8601 instant with Z or an offset>`: a single slot.

A slot is an aware UTC datetime. Cron slots are computed in the job's IANA zone with the DST
rules of cronie (DESIGN.md invariant 3):

- a *fixed-time* expression (none of the second, minute and hour fields starts with `*`) whose
  local time falls in a skipped interval runs once, at the first instant after the jump (several
  skipped times collapse into that one slot); in a repeated interval it runs once, on the first
  pass;
- a *wildcard* expression (one of those fields starts with `*`, e.g. `*/5 * * * *`, `@hourly`)
  follows real elapsed time: skipped local times do not happen, repeated ones happen twice.

Day-of-month and day-of-week, when both are restricted (neither starts with `*` or `?`), match
either day, as in cron. When one of them starts with `*` the two are ANDed, which is also what
cron does (`0 0 */2 * MON` is "odd days that are Mondays").

The cron matcher is our own, over bit masks, rather than croniter: croniter runs a fixed-time
job twice in a repeated hour, its messages do not say what to write instead, and the ticker
needs `next_slot` to cost microseconds for 100,000 jobs.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from itertools import islice
from typing import Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kjob.errors import InvalidInput, ScheduleError
from kjob.model.durations import parse_duration

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_ONE_US = timedelta(microseconds=1)
_ONE_S = timedelta(seconds=1)

#: The search for the next cron match gives up past this year (datetime stops at 9999).
_LAST_YEAR = 9998

EXAMPLES = "e.g. '0 9 * * MON', '*/5 * * * *', '@daily', '@every 90s' or '@once 2026-05-15T10:00Z'"

MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August",
                "September", "October", "November", "December")
#: Longest each month can be (February in a leap year).
_MAX_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()
    names_from: int = 0  # the number of names[0]
    hint: str = ""
    size: int = 0  # distinct values; 0 = high - low + 1

    @property
    def count(self) -> int:
        return self.size or self.high - self.low + 1


_SECOND = _Field("second", 0, 59)
_MINUTE = _Field("minute", 0, 59)
_HOUR = _Field("hour", 0, 23)
_DOM = _Field("day-of-month", 1, 31)
_MONTH = _Field("month", 1, 12, _MONTHS, 1, "JAN-DEC or 1-12")
_DOW = _Field("day-of-week", 0, 7, _DAYS, 0, "SUN-SAT or 0-7", size=7)
_FIELDS = (_SECOND, _MINUTE, _HOUR, _DOM, _MONTH, _DOW)
_QUARTZ = re.compile(r"^(L|LW|\d+[LW]|[A-Za-z0-9]+L|[A-Za-z0-9]+#\d+)$", re.IGNORECASE)
_ITEM = re.compile(r"^(?:(\*|\?)|([A-Za-z0-9]+)(?:-([A-Za-z0-9]+))?)(?:/(.*))?$")


def zone(name: str) -> ZoneInfo:
    """The IANA zone `name`. Raises ScheduleError (field `timezone`) if this machine has no such zone."""
    try:
        # OSError: a name too long for a file name (zoneinfo looks it up as a file); it would
        # otherwise pass for a failing disk, or the gateway's "database unavailable".
        return _zone(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise ScheduleError(
            f"unknown time zone {shown!r}; use an IANA name such as 'UTC' or 'Europe/Berlin'",
            "timezone",
        ) from None


@lru_cache(maxsize=1024)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _error(expr: str, what: str) -> ScheduleError:
    return ScheduleError(f"{expr!r}: {what}", "schedule")


# --- cron ----------------------------------------------------------------------------------


def _value(token: str, f: _Field, expr: str) -> int:
    if token.isascii() and token.isdigit():
        n = int(token)
        if not f.low <= n <= f.high:
            raise _error(expr, f"{f.name} {n} is out of range {f.low}-{f.high}")
        return n
    upper = token.upper()
    if upper in f.names:
        return f.names.index(upper) + f.names_from
    expected = f.hint or f"{f.low}-{f.high}"
    kind = "a name or number" if f.names else "a number"
    raise _error(expr, f"{f.name} {token!r} is not {kind}; use {expected}")


def _parse_field(text: str, f: _Field, expr: str) -> int:
    """The bit mask of the values `text` names in field `f`."""
    mask = 0
    for item in text.split(","):
        day_field = f is _DOM or f is _DOW
        if day_field and _QUARTZ.match(item):
            raise _error(expr, f"{f.name} {item!r} (Quartz L, W or #) is not supported; "
                               "use numbers, names, '*', ranges, steps and lists")
        m = _ITEM.match(item)
        if not item or not m:
            raise _error(expr, f"{f.name} {item!r} is not valid; write a value, '*', 'a-b', "
                               "'*/n' or a list 'a,b'")
        star, first, last, step_text = m.groups()
        if star == "?" and not day_field:
            raise _error(expr, f"'?' is only allowed in the day fields; write '*' for every {f.name}")
        if star:
            lo, hi = f.low, f.high
        else:
            lo = _value(first, f, expr)
            if last is not None:
                hi = _value(last, f, expr)
            elif step_text is not None:
                hi = f.high  # `a/n` means from a to the end, as croniter and robfig read it
            else:
                hi = lo
            if hi < lo:
                end, start = (f.names[-1], f.names[0]) if f.names and not first.isdigit() else (f.high, f.low)
                raise _error(expr, f"{f.name} range {first}-{last} runs backwards; write the "
                                   f"smaller value first, or split it, e.g. '{first}-{end},{start}-{last}'")
        step = 1
        if step_text is not None:
            if not (step_text.isascii() and step_text.isdigit()) or int(step_text) == 0:
                raise _error(expr, f"{f.name} step {step_text!r} must be a whole number of at "
                                   f"least 1, e.g. '*/5'")
            step = int(step_text)
            if star and step >= f.count:
                # cron would accept it and fire once per cycle, never what `*/90` meant
                raise _error(expr, f"{f.name} step {step} leaves only one {f.name} in "
                                   f"{f.low}-{f.high}; write that value, or '@every' for "
                                   "longer intervals, e.g. '@every 90m'")
        for v in range(lo, hi + 1, step):
            mask |= 1 << v
    if f is _DOW and mask & (1 << 7):  # 7 is Sunday too
        mask = (mask | 1) & 0x7F
    return mask


def _next_bit(mask: int, v: int) -> int:
    """The smallest value >= v in `mask`, or -1."""
    m = mask >> v
    if not m:
        return -1
    return v + (m & -m).bit_length() - 1


@lru_cache(maxsize=1024)
def _days_by_weekday(dow_mask: int, first_weekday: int) -> int:
    """Days 1-31 (as bits) of a month starting on `first_weekday` (0 = Sunday) that are in `dow_mask`."""
    out = 0
    for day in range(1, 32):
        if dow_mask >> ((first_weekday + day - 1) % 7) & 1:
            out |= 1 << day
    return out


def _month_days(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return _MAX_MONTH_DAYS[month - 1]


@dataclass(frozen=True, slots=True)
class _Cron:
    """A parsed cron expression: one bit mask per field. Shared by every job with the same text."""

    seconds: int
    minutes: int
    hours: int
    doms: int
    months: int
    dows: int
    #: both day fields restricted: a day matches if either does (cron's OR)
    day_or: bool
    #: cronie's "fixed-time" job: none of second, minute, hour starts with `*`
    fixed: bool

    def day_mask(self, year: int, month: int) -> int:
        """Days of this month (as bits 1-31) on which the expression fires."""
        first = (date(year, month, 1).weekday() + 1) % 7  # cron counts Sunday as 0
        by_dow = _days_by_weekday(self.dows, first)
        days = (self.doms | by_dow) if self.day_or else (self.doms & by_dow)
        return days & ((2 << _month_days(year, month)) - 2)

    def next_local(self, t: datetime) -> datetime | None:
        """The first matching wall-clock time strictly after naive `t` (second resolution)."""
        y, mo, d, h, mi, s = t.year, t.month, t.day, t.hour, t.minute, t.second + 1
        while y <= _LAST_YEAR:
            m = _next_bit(self.months, mo)
            if m < 0:
                y, mo, d, h, mi, s = y + 1, 1, 1, 0, 0, 0
                continue
            if m != mo:
                mo, d, h, mi, s = m, 1, 0, 0, 0
            nd = _next_bit(self.day_mask(y, mo), d)
            if nd < 0:
                if mo == 12:
                    y, mo = y + 1, 1
                else:
                    mo += 1
                d, h, mi, s = 1, 0, 0, 0
                continue
            if nd != d:
                d, h, mi, s = nd, 0, 0, 0
            nh = _next_bit(self.hours, h)
            if nh < 0:
                d, h, mi, s = d + 1, 0, 0, 0
                continue
            if nh != h:
                h, mi, s = nh, 0, 0
            nmi = _next_bit(self.minutes, mi)
            if nmi < 0:
                h, mi, s = h + 1, 0, 0
                continue
            if nmi != mi:
                mi, s = nmi, 0
            ns = _next_bit(self.seconds, s)
            if ns < 0:
                mi, s = mi + 1, 0
                continue
            return datetime(y, mo, d, h, mi, ns)
        return None


def _can_fire(c: _Cron) -> bool:
    if c.day_or:
        return True  # some weekday in every week of every month
    # ANDed day fields: every (day, weekday) pair recurs, so only day-vs-month length matters.
    return any(
        c.months >> mo & 1 and c.doms & ((2 << _MAX_MONTH_DAYS[mo - 1]) - 2)
        for mo in range(1, 13)
    )


def _parse_cron(expr: str) -> _Cron:
    texts = expr.split(" ")
    if len(texts) == 5:
        texts.insert(0, "0")  # 5 fields: on the minute
    elif len(texts) != 6:
        extra = "; a 7th (year) field is not supported" if len(texts) == 7 else ""
        raise _error(expr, f"a cron expression has 5 fields (minute hour day-of-month month "
                           f"day-of-week) or 6 with seconds first, not {len(texts)}{extra}; {EXAMPLES}")
    masks = [_parse_field(t, f, expr) for t, f in zip(texts, _FIELDS)]
    sec, minute, hour, dom, month, dow = texts
    day_star = dom[0] in "*?"
    dow_star = dow[0] in "*?"
    c = _Cron(*masks, day_or=not day_star and not dow_star,
              fixed=not any(t.startswith("*") for t in (sec, minute, hour)))
    if not _can_fire(c):
        days = ",".join(str(d) for d in range(1, 32) if c.doms >> d & 1)
        months = ", ".join(_MONTH_NAMES[m - 1] for m in range(1, 13) if c.months >> m & 1)
        raise _error(expr, f"never fires: day {days} does not occur in {months}; "
                           "pick a day that exists in those months")
    return c


# --- @every and @once ------------------------------------------------------------------------


#: Bounds that keep every later computation (slot + jitter, retries, catch-up) in datetime's range.
MAX_EVERY = timedelta(days=366)
MAX_ONCE_YEAR = 2199


@dataclass(frozen=True, slots=True)
class _Every:
    interval_us: int


@dataclass(frozen=True, slots=True)
class _Once:
    at: datetime  # aware, UTC


def _parse_every(expr: str, arg: str) -> _Every:
    if not arg:
        raise _error(expr, "@every needs an interval, e.g. '@every 5m' or '@every 90s'")
    try:
        interval = parse_duration(arg, "schedule")
    except InvalidInput:
        raise _error(expr, f"{arg!r} is not a duration; write e.g. '@every 45s', '@every 30m' "
                           "or '@every 1h30m'") from None
    if interval < _ONE_S:
        raise _error(expr, "the interval must be at least 1s")
    if interval > MAX_EVERY:
        raise _error(expr, f"the interval can be at most {MAX_EVERY.days}d; for rarer runs use a cron "
                           "expression, e.g. '0 9 1 1 *' (yearly)")
    return _Every(interval // _ONE_US)


def _parse_once(expr: str, arg: str) -> _Once:
    if not arg:
        raise _error(expr, "@once needs an instant, e.g. '@once 2026-05-15T10:00Z'")
    try:
        at = datetime.fromisoformat(arg)
    except ValueError:
        raise _error(expr, f"{arg!r} is not an ISO-8601 instant; write e.g. "
                           "'@once 2026-05-15T10:00Z' or '@once 2026-05-15T12:00+02:00'") from None
    if at.tzinfo is None or at.utcoffset() is None:
        raise _error(expr, "the instant has no UTC offset; add 'Z' or an offset, e.g. "
                           "'@once 2026-05-15T10:00Z' or '@once 2026-05-15T12:00+02:00'")
    try:
        at = at.astimezone(UTC)
    except OverflowError:  # year 1 with a positive offset, year 9999 with a negative one
        at = datetime.min.replace(tzinfo=UTC) if at.year == 1 else datetime.max.replace(tzinfo=UTC)
    if at.year > MAX_ONCE_YEAR:
        raise _error(expr, f"the instant is after the year {MAX_ONCE_YEAR}; kjob schedules within that")
    return _Once(at)


_Rule = _Cron | _Every | _Once


@lru_cache(maxsize=8192)
def _compile(expr: str) -> _Rule:
    """The rule for normalised `expr`; cached so jobs with the same text share one object."""
    if not expr:
        raise ScheduleError(f"the schedule is empty; write one, {EXAMPLES}", "schedule")
    if not expr.startswith("@"):
        return _parse_cron(expr)
    word, _, arg = expr.partition(" ")
    word = word.lower()
    if word == "@every":
        return _parse_every(expr, arg)
    if word == "@once":
        return _parse_once(expr, arg)
    if word in MACROS:
        if arg:
            raise _error(expr, f"{word} takes no argument; write just '{word}'")
        return _parse_cron(MACROS[word])
    raise _error(expr, f"{word} is not a schedule; use a cron expression, "
                       f"{', '.join(m for m in MACROS if m not in ('@midnight', '@annually'))}, "
                       "'@every <duration>' or '@once <instant>'")


# --- slots -------------------------------------------------------------------------------------


def _aware_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("naive datetime: schedules only handle aware instants")
    return moment.astimezone(UTC)


def _offset_at(z: ZoneInfo, utc_naive: datetime) -> timedelta:
    """The offset of `z` at the instant `utc_naive` (naive UTC)."""
    return utc_naive.replace(tzinfo=UTC).astimezone(z).utcoffset()  # type: ignore[return-value]


def _wall_offsets(z: ZoneInfo, local: datetime) -> tuple[timedelta, timedelta]:
    """The offsets of wall time `local` on its first and second pass (PEP 495 `fold`).

    Equal for an ordinary time; first > second in a repeated interval; first < second in a
    skipped one (zoneinfo then gives the offsets from before and after the jump).
    """
    return (local.replace(tzinfo=z).utcoffset(),  # type: ignore[return-value]
            local.replace(tzinfo=z, fold=1).utcoffset())


@lru_cache(maxsize=1024)
def _jump_instant(z: ZoneInfo, lo: datetime, hi: datetime) -> datetime:
    """The first instant (naive UTC, whole seconds) in (lo, hi] after a forward jump of `z`.

    `lo` is before the jump and `hi` after it. Bisection rather than assuming whole hours, so
    zones with 30-minute shifts (Australia/Lord_Howe) and odd historical ones work.
    """
    before = _offset_at(z, lo)
    lo_s, hi_s = 0, int((hi - lo).total_seconds())
    while hi_s - lo_s > 1:
        mid = (lo_s + hi_s) // 2
        if _offset_at(z, lo + timedelta(seconds=mid)) == before:
            lo_s = mid
        else:
            hi_s = mid
    return lo + timedelta(seconds=hi_s)


def _cron_slots(c: _Cron, after: datetime, z: ZoneInfo | None) -> Iterator[datetime]:
    """Cron slots strictly after naive-UTC `after`, in zone `z` (None = UTC), as naive UTC."""
    if z is None:
        t = c.next_local(after)
        while t is not None:
            yield t
            t = c.next_local(t)
        return
    # Start the local search early enough to see the second pass of a repeated interval
    # that begins after `after` but whose wall clock reads earlier than `after`'s.
    off_now = _offset_at(z, after)
    rewind = max(off_now - _offset_at(z, after + timedelta(days=1)), timedelta(0))
    local = c.next_local(after + off_now - rewind)
    last = after
    second_pass: deque[datetime] = deque()  # repeated-interval instants of wildcard jobs, ascending
    while local is not None:
        off0, off1 = _wall_offsets(z, local)
        later = None
        if off0 == off1:
            instant = local - off0
        elif off0 > off1:
            # a repeated (fall-back) wall time: first pass at off0, second at off1
            instant = local - off0
            if not c.fixed:
                later = local - off1
        else:
            # a skipped (spring-forward) wall time: a fixed-time job runs once, as the clock
            # lands; for a wildcard job these times do not happen, so resume after the jump
            instant = _jump_instant(z, local - off1, local - off0)
            if not c.fixed:
                local = c.next_local(instant + off1 - _ONE_S)
                continue
        while second_pass and second_pass[0] <= instant:
            p = second_pass.popleft()
            if p > last:
                yield p
                last = p
        if instant > last:
            yield instant
            last = instant
        if later is not None:
            second_pass.append(later)
        local = c.next_local(local)
    for p in second_pass:
        if p > last:
            yield p
            last = p


def _every_slots(e: _Every, after: datetime) -> Iterator[datetime]:
    since_epoch_us = (after - _EPOCH_NAIVE) // _ONE_US
    k = since_epoch_us // e.interval_us + 1
    try:
        while True:
            yield _EPOCH_NAIVE + timedelta(microseconds=k * e.interval_us)
            k += 1
    except OverflowError:
        return


def _zone_or_utc(tz: str) -> ZoneInfo | None:
    """None for UTC itself, so the common case skips all DST work."""
    if tz in ("UTC", "Etc/UTC"):
        return None
    return zone(tz)


@dataclass(frozen=True, slots=True)
class Schedule:
    """A parsed schedule. `expr` is the user's text with whitespace normalised.

    Construction validates: `Schedule("61 * * * *")` raises ScheduleError (field `schedule`).
    Objects are small and the parsed rule is shared between equal expressions.
    """

    expr: str
    _rule: _Rule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.expr, str):
            raise ScheduleError(f"a schedule is text, {EXAMPLES}", "schedule")
        norm = " ".join(self.expr.split())
        object.__setattr__(self, "expr", norm)
        object.__setattr__(self, "_rule", _compile(norm))

    @classmethod
    def parse(cls, expr: str) -> "Schedule":
        """Parse and validate `expr`. Raises ScheduleError with a message saying what to write."""
        return cls(expr)

    @property
    def is_once(self) -> bool:
        return isinstance(self._rule, _Once)

    @property
    def once_at(self) -> datetime | None:
        """The single slot of a `@once` schedule (aware UTC), else None."""
        return self._rule.at if isinstance(self._rule, _Once) else None

    @property
    def interval(self) -> timedelta | None:
        """The interval of an `@every` schedule, else None."""
        return timedelta(microseconds=self._rule.interval_us) if isinstance(self._rule, _Every) else None

    @property
    def fixed_time(self) -> bool:
        """True for a cron whose second, minute and hour fields are all fixed (cronie's DST rule)."""
        return isinstance(self._rule, _Cron) and self._rule.fixed

    def check_future(self, now: datetime) -> None:
        """Refuse a `@once` whose instant is not after `now` (it would never run)."""
        at = self.once_at
        if at is not None and at <= _aware_utc(now):
            raise _error(self.expr, f"{at.strftime('%Y-%m-%dT%H:%M:%SZ')} is in the past; "
                                    "pick a later instant")

    def slots(self, after: datetime, tz: str = "UTC") -> Iterator[datetime]:
        """The slots strictly after aware `after`, ascending, as aware UTC datetimes.

        Lazy and infinite for cron and `@every` (a cron ends at year 9998); one or no slot
        for `@once`. `tz` is the job's IANA zone; only cron uses it. Raises, before the first
        slot, ScheduleError (field `timezone`) for an unknown zone and ValueError for a naive
        `after`.
        """
        start = _aware_utc(after).replace(tzinfo=None)
        rule = self._rule
        if isinstance(rule, _Cron):
            naive = _cron_slots(rule, start, _zone_or_utc(tz))
        else:
            zone(tz)
            if isinstance(rule, _Every):
                naive = _every_slots(rule, start)
            else:
                at = rule.at.replace(tzinfo=None)
                naive = iter((at,) if at > start else ())
        return (t.replace(tzinfo=UTC) for t in naive)

    def next_slot(self, after: datetime, tz: str = "UTC") -> datetime | None:
        """The first slot strictly after `after`, or None if there is none. Same errors as `slots`."""
        return next(self.slots(after, tz), None)


def next_slots(expr: str, tz: str, after: datetime, n: int) -> list[datetime]:
    """The next `n` slots of `expr` in zone `tz` after `after` (for `kjob next` and API previews)."""
    return list(islice(Schedule.parse(expr).slots(after, tz), max(n, 0)))
