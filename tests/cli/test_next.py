"""`kjob next`: previews a schedule with no server at all."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import Run, one_line_error

EXAMPLE = ["next", "30 2 * * *", "--tz", "America/New_York", "--after", "2026-03-07T00:00:00Z", "-n", "3"]


def test_spring_forward_slot_shows_once_at_three_local(offline: Run) -> None:
    result = offline(*EXAMPLE)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.count("2026-03-08 ") == 1
    assert "2026-03-08 03:00:00 EDT" in out and "2026-03-08T07:00:00Z" in out
    assert "2026-03-07 02:30:00 EST" in out and "2026-03-09 02:30:00 EDT" in out


def test_json_is_an_array_of_utc_instants(offline: Run) -> None:
    result = offline(*EXAMPLE, "-o", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == ["2026-03-07T07:30:00Z", "2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z"]


def test_fall_back_slot_shows_once(offline: Run) -> None:
    result = offline(
        "next", "30 1 * * *", "--tz", "America/New_York", "--after", "2026-10-31T12:00:00Z", "-n", "2", "-o", "json"
    )
    assert json.loads(result.stdout) == ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]


def test_defaults_are_five_slots_from_now_in_utc(offline: Run) -> None:
    slots = json.loads(offline("next", "@every 90s", "-o", "json").stdout)
    assert len(slots) == 5 and slots == sorted(slots)


@pytest.mark.parametrize(
    "args,field",
    [
        (["61 * * * *"], "schedule"),
        (["@every 0s"], "schedule"),
        (["@daily", "--tz", "Mars/Olympus_Mons"], "tz"),
        (["@daily", "--after", "next tuesday"], "after"),
        (["@daily", "-n", "0"], "n"),
        (["@daily", "-n", "101"], "n"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(offline: Run, args: list[str], field: str) -> None:
    one_line_error(offline("next", *args), field)


@pytest.mark.parametrize("args", [["@daily", "-o", "yaml"], ["@daily", "-n", "many"], [], ["@daily", "--bogus"]])
def test_usage_errors_are_one_line_and_exit_2(offline: Run, args: list[str]) -> None:
    message = one_line_error(offline("next", *args), code=2)
    assert "kjob next --help" in message
