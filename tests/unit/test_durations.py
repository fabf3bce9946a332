"""Durations as people write them, and the text kjob writes back."""

from __future__ import annotations

from datetime import timedelta

import pytest

from kjob.errors import InvalidInput
from kjob.model.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("45s", timedelta(seconds=45)),
        ("30m", timedelta(minutes=30)),
        ("2h", timedelta(hours=2)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d", timedelta(days=1)),
        ("500ms", timedelta(milliseconds=500)),
        ("1h30m15s", timedelta(hours=1, minutes=30, seconds=15)),
        (" 2H ", timedelta(hours=2)),
        ("0s", timedelta(0)),
    ],
)
def test_durations_people_write_are_read(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "a duration cannot be empty"),
        ("   ", "a duration cannot be empty"),
        ("90", "'90' is not a duration; write e.g. '45s', '30m', '2h' or '1h30m'"),
        ("1h 30m", "is not a duration"),
        ("-5m", "is not a duration"),
        ("1.5h", "is not a duration"),
        ("5 minutes", "is not a duration"),
        ("1w", "is not a duration"),
        ("99999999999999d", "too long a duration"),
        (90, "expected a duration such as '45s'"),
    ],
)
def test_anything_else_is_refused_naming_the_field(text: object, message: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_duration(text, "timeout")  # type: ignore[arg-type]
    assert message in e.value.message
    assert e.value.field == "timeout"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(minutes=30), "30m"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(days=1, seconds=1), "1d1s"),
        (timedelta(milliseconds=1500), "1s500ms"),
        (timedelta(0), "0s"),
    ],
)
def test_format_writes_the_shortest_text_that_reads_back(value: timedelta, text: str) -> None:
    assert format_duration(value) == text
    assert parse_duration(text) == value
