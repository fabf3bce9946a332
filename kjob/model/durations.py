"""Durations written the way people write them: `45s`, `30m`, `2h`, `1h30m`, `1d`, `500ms`."""

from __future__ import annotations

import re
from datetime import timedelta

from kjob.errors import InvalidInput

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_PART = re.compile(r"(\d+)(ms|s|m|h|d)")


def parse_duration(text: str, field: str = "duration") -> timedelta:
    """Parse `1h30m`-style text. Raises InvalidInput naming `field` on anything else."""
    if not isinstance(text, str):
        raise InvalidInput(f"expected a duration such as '45s', '30m' or '1h30m', got {text!r}", field)
    s = text.strip().lower()
    if not s:
        raise InvalidInput("a duration cannot be empty; write e.g. '45s', '30m' or '1h30m'", field)
    pos, total_ms = 0, 0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total_ms += int(m.group(1)) * _UNITS_MS[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise InvalidInput(
            f"{text!r} is not a duration; write e.g. '45s', '30m', '2h' or '1h30m'", field
        )
    try:
        return timedelta(milliseconds=total_ms)
    except OverflowError:
        raise InvalidInput(f"{text!r} is too long a duration; write e.g. '30m' or '2h'", field) from None


def format_duration(value: timedelta) -> str:
    """The shortest text that `parse_duration` reads back as `value`."""
    ms = round(value.total_seconds() * 1000)
    if ms == 0:
        return "0s"
    out = []
    for unit in ("d", "h", "m", "s", "ms"):
        n, ms = divmod(ms, _UNITS_MS[unit])
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)
