"""The dashboard's pure helpers: schedules in words, outcome summaries, filters, session bits."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from kjob.gateway.ui import present
from kjob.gateway.ui.session import csrf_ok, csrf_token, safe_next

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("expr, words", [
    ("*/5 * * * *", "every 5 minutes"),
    ("* * * * *", "every minute"),
    ("0 9 * * MON", "at 09:00 on Monday"),
    ("30 8 * * MON,FRI", "at 08:30 on Monday, Friday"),
    ("0 9,17 * * *", "every day at 09:00, 17:00"),
    ("@daily", "every day at 00:00"),
    ("@hourly", "every hour"),
    ("15 * * * *", "every hour at minute 15"),
    ("0 0 1 * *", "at 00:00 on day 1 of the month"),
    ("0 0 1 1 *", "at 00:00 on day 1 of the month in Jan"),
    ("*/10 * * * * *", "every 10 seconds"),
    ("@every 90s", "every 90 seconds (counted in UTC)"),
    ("@every 2h", "every 2 hours (counted in UTC)"),
    ("@once 2026-05-15T10:00Z", "once, at 2026-05-15 10:00:00 UTC"),
    # Shapes without a sentence say so rather than guess.
    ("0 9-17 * * 1-5", "as the cron expression says"),
    ("*/15 9-17 * * *", "as the cron expression says"),
])
def test_schedule_words(expr: str, words: str) -> None:
    assert present.schedule_words(expr) == words


def run(status: str, minutes_ago: int) -> dict:
    at = T0 - timedelta(minutes=minutes_ago)
    return {"status": status, "slot": at, "finished_at": at + timedelta(seconds=5)}


def test_outcomes_count_the_streak_through_missed_slots_and_ignore_open_runs() -> None:
    runs = [run("running", 0), run("failed", 1), run("missed", 2), run("timed_out", 3), run("succeeded", 4),
            run("failed", 5)]
    summary = present.outcomes(runs)
    assert summary.streak == 2  # failed, (missed is not a run), timed_out, then a success
    assert summary.last == "failed"
    assert summary.strip == ["failed", "succeeded", "timed_out", "missed", "failed"]  # oldest first
    assert summary.last_success == runs[4]["finished_at"]
    assert summary.last_failure == runs[1]["finished_at"]
    assert (summary.succeeded, summary.failed) == (1, 3)
    assert present.outcomes([]).last is None and present.outcomes([]).strip == []
    assert len(present.outcomes([run("succeeded", i) for i in range(30)]).strip) == 20


def job(slug: str, enabled: bool = True, next_fire: str | None = None, **labels: str) -> dict:
    return {"slug": slug, "enabled": enabled, "next_fire": next_fire, "labels": labels, "description": "",
            "agent": "shell", "prompt": f"echo {slug}"}


def test_filters_and_sorts() -> None:
    ok = present.outcomes([run("succeeded", 1)])
    bad = present.outcomes([run("failed", 10)])
    rows = [(job("b", next_fire="2026-12-02T00:00:00Z", team="ops"), ok),
            (job("a", enabled=False), bad),
            (job("c", next_fire="2026-12-01T13:00:00Z", team="dev"), present.outcomes([]))]
    slugs = lambda chosen: [j["slug"] for j, _ in chosen]  # noqa: E731
    assert slugs(present.filter_jobs(rows)) == ["a", "b", "c"]
    assert slugs(present.filter_jobs(rows, status="paused")) == ["a"]
    assert slugs(present.filter_jobs(rows, status="failing")) == ["a"]
    assert slugs(present.filter_jobs(rows, status="enabled", sort="next")) == ["c", "b"]
    assert slugs(present.filter_jobs(rows, sort="next")) == ["c", "b", "a"]  # paused last
    assert slugs(present.filter_jobs(rows, sort="last")) == ["b", "a", "c"]  # never run last
    assert slugs(present.filter_jobs(rows, label="team")) == ["b", "c"]
    assert slugs(present.filter_jobs(rows, label="team=dev")) == ["c"]
    assert slugs(present.filter_jobs(rows, text="ECHO C")) == ["c"]


def test_durations() -> None:
    assert [present.duration_words(s) for s in (None, 1.23, 42, 125, 3600, 7500)] == [
        "", "1.2 s", "42 s", "2 min 5 s", "1 h", "2 h 5 min"]


def test_csrf_tokens_are_per_session_and_next_stays_on_the_dashboard() -> None:
    assert csrf_token("a") == csrf_token("a") != csrf_token("b")
    assert csrf_ok("a", csrf_token("a")) and not csrf_ok("a", csrf_token("b")) and not csrf_ok("a", None)
    assert safe_next("/ui/runs/x?y=1") == "/ui/runs/x?y=1"
    for bad in (None, "", "//evil/ui/", "https://evil/", "/v1/jobs", "/ui", "/ui\\x"):
        assert safe_next(bad) == "/ui/"


def test_kjob_dashboard_prints_the_login_url_of_the_cli_target(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from kjob.cli.main import app

    for name in ("KJOB_API_URL", "KJOB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    env = {"KJOB_HOME": str(tmp_path), "KJOB_CONFIG": str(tmp_path / "none.toml")}
    result = CliRunner().invoke(app, ["dashboard"], env=env)
    assert result.exit_code == 1 and "no token" in result.output
    (tmp_path / "api.url").write_text("http://127.0.0.1:9999")
    (tmp_path / "admin.token").write_text("kjob_abc_def\n")
    result = CliRunner().invoke(app, ["dashboard"], env=env)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "http://127.0.0.1:9999/ui/?token=kjob_abc_def"
