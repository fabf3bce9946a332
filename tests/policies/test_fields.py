"""The policy fields through the API and the CLI: what `kjob create` sets, what `kjob inspect`
shows (including a pause's note and time), and that each bad value is refused naming its field
while nothing is stored."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from tests.cli.conftest import Run
from tests.policies.conftest import one_line_error
from tests.policies.test_model import BAD_POLICIES
from tests.support.gateway import assert_error, job_body

CREATE = ["create", "--slug", "nightly", "--prompt", "echo hi", "--schedule", "0 3 * * *", "--agent", "kode"]


def inspect_json(kjob: Run, slug: str = "nightly") -> dict:
    result = kjob("inspect", slug, "-o", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_create_flags_set_every_policy_and_inspect_shows_them(kjob: Run) -> None:
    result = kjob(*CREATE, "--overlap", "queue", "--jitter", "45s", "--catchup-window", "6h", "--catchup-policy",
                  "all", "--pause-after-failures", "3", "--keep-runs", "100", "--keep-days", "30")
    assert result.exit_code == 0, result.output
    job = inspect_json(kjob)
    assert job["overlap"] == "queue" and job["jitter"] == "45s"
    assert job["catchup"] == {"window": "6h", "policy": "all"}
    assert job["pause_after_failures"] == 3
    assert job["history"] == {"keep_runs": 100, "keep_days": 30}
    table = kjob("inspect", "nightly").stdout
    for line in ("overlap      queue", "catch-up     after downtime, run every missed slot of the last 6h",
                 "jitter       up to 45s", "pause after  3 failed runs in a row", "history      keep newest 100 runs, 30 days"):
        assert line in table, table


def test_a_job_created_without_policy_flags_shows_the_defaults(kjob: Run) -> None:
    assert kjob(*CREATE).exit_code == 0
    table = kjob("inspect", "nightly").stdout
    for line in ("overlap      skip", "catch-up     after downtime, run the latest missed slot of the last 1h",
                 "jitter       none", "pause after  never", "history      keep all"):
        assert line in table, table


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--overlap", "sometimes"], "overlap"),
        (["--jitter", "30 seconds"], "jitter"),
        (["--jitter", "2d"], "jitter"),
        (["--catchup-window", "an hour"], "catchup.window"),
        (["--catchup-policy", "some"], "catchup.policy"),
        (["--pause-after-failures", "0"], "pause_after_failures"),
        (["--keep-runs", "0"], "history.keep_runs"),
        (["--keep-days", "0"], "history.keep_days"),
    ],
)
def test_a_bad_policy_flag_is_one_line_naming_the_field_and_creates_nothing(kjob: Run, flags, field) -> None:
    one_line_error(kjob(*CREATE, *flags), field)
    assert json.loads(kjob("list", "-o", "json").stdout) == []


def test_inspect_shows_why_and_since_when_a_job_is_paused(kjob: Run) -> None:
    assert kjob(*CREATE).exit_code == 0
    before = datetime.now(timezone.utc)
    result = kjob("disable", "nightly", "--note", "waiting for the new API key")
    assert result.exit_code == 0 and result.stdout == "disabled nightly\n"
    job = inspect_json(kjob)
    paused_at = datetime.fromisoformat(job["paused_at"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= paused_at <= datetime.now(timezone.utc)
    table = kjob("inspect", "nightly").stdout
    assert "enabled      no" in table
    assert f"paused       since {job['paused_at']}: waiting for the new API key" in table
    # a new note keeps the time of the pause; enabling clears both
    assert kjob("disable", "nightly", "--note", "still waiting").exit_code == 0
    again = inspect_json(kjob)
    assert again["paused_at"] == job["paused_at"] and again["paused_note"] == "still waiting"
    assert kjob("enable", "nightly").exit_code == 0
    enabled = inspect_json(kjob)
    assert enabled["paused_at"] is None and enabled["paused_note"] is None
    assert "paused" not in kjob("inspect", "nightly").stdout


def test_a_job_created_disabled_is_paused_since_its_creation(kjob: Run) -> None:
    assert kjob(*CREATE, "--disabled").exit_code == 0
    job = inspect_json(kjob)
    assert job["paused_at"] == job["created_at"]


@pytest.mark.parametrize(("change", "field"), BAD_POLICIES)
async def test_the_api_refuses_each_bad_policy_value_naming_the_field_and_stores_nothing(api, change, field) -> None:
    response = await api.post("/v1/jobs", json=job_body(**change))
    assert_error(response, 422, field)
    assert (await api.get("/v1/jobs")).json() == []


async def test_a_bad_policy_in_a_patch_changes_nothing(api) -> None:
    created = (await api.post("/v1/jobs", json=job_body(overlap="queue"))).json()
    assert_error(await api.patch("/v1/jobs/weekly-audit", json={"overlap": "never"}), 422, "overlap")
    assert_error(await api.patch("/v1/jobs/weekly-audit", json={"history": {"keep_days": 0}}), 422, "history.keep_days")
    assert (await api.get("/v1/jobs/weekly-audit")).json() == created
    patched = (await api.patch("/v1/jobs/weekly-audit", json={"history": {"keep_runs": 5}, "jitter": "10s"})).json()
    assert patched["history"] == {"keep_runs": 5, "keep_days": None} and patched["jitter"] == "10s"
    assert patched["overlap"] == "queue"
