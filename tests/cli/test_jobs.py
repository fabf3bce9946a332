"""The job commands against a real gateway and PostgreSQL."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from kjob.model.schedule import next_slots
from tests.cli.conftest import Run, one_line_error

CREATE = [
    "create",
    "--slug",
    "weekly-audit",
    "--prompt",
    "/k-housekeep",
    "--schedule",
    "0 9 * * MON",
    "--agent",
    "kode",
    "--tz",
    "Europe/Berlin",
]


def jobs_json(kjob: Run) -> list[dict]:
    result = kjob("list", "-o", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_create_then_list_shows_the_job(kjob: Run) -> None:
    result = kjob(
        *CREATE,
        "--sandbox",
        "docker:koder-cli:latest",
        "--output",
        "webhook:https://hooks.example/x",
        "--retries",
        "3",
        "--backoff",
        "fixed",
        "--timeout",
        "1h30m",
        "--description",
        "Monday audit",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("created weekly-audit; next fire 20")
    table = kjob("list")
    assert table.exit_code == 0
    assert "weekly-audit" in table.stdout and "0 9 * * MON" in table.stdout and "Europe/Berlin" in table.stdout
    [job] = jobs_json(kjob)
    assert {"slug", "schedule", "timezone", "agent", "enabled", "next_fire"} <= set(job)
    assert job["sandbox"]["backend"] == "docker" and job["sandbox"]["image"] == "koder-cli:latest"
    assert job["output"]["channel"] == "webhook:https://hooks.example/x"
    assert job["retries"]["max"] == 3 and job["retries"]["backoff"] == "fixed"
    assert job["timeout"] == "1h30m" and job["description"] == "Monday audit" and job["enabled"] is True
    expected = next_slots("0 9 * * MON", "Europe/Berlin", datetime.now(timezone.utc), 1)[0]
    assert job["next_fire"] == expected.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_create_disabled(kjob: Run) -> None:
    assert kjob(*CREATE, "--disabled").stdout == "created weekly-audit; disabled: no fire times until enabled\n"
    [job] = jobs_json(kjob)
    assert job["enabled"] is False and job["next_fire"] is None


def test_an_empty_list_says_how_to_start(kjob: Run) -> None:
    assert "kjob create" in kjob("list").stdout
    assert jobs_json(kjob) == []


def test_inspect_shows_next_five_fires_in_zone_and_utc(kjob: Run) -> None:
    kjob(
        "create",
        "--slug",
        "ny",
        "--prompt",
        "p",
        "--schedule",
        "30 2 * * *",
        "--agent",
        "kode",
        "--tz",
        "America/New_York",
    )
    slots = next_slots("30 2 * * *", "America/New_York", datetime.now(timezone.utc), 5)
    result = kjob("inspect", "ny")
    assert result.exit_code == 0, result.output
    for slot in slots:
        local = slot.astimezone(__import__("zoneinfo").ZoneInfo("America/New_York"))
        assert slot.strftime("%Y-%m-%dT%H:%M:%SZ") in result.stdout
        assert local.strftime("%Y-%m-%d %H:%M:%S %Z") in result.stdout
    data = json.loads(kjob("inspect", "ny", "-o", "json").stdout)
    assert data["slug"] == "ny" and data["next_fires"] == [s.strftime("%Y-%m-%dT%H:%M:%SZ") for s in slots]


def test_disable_with_note_then_enable(kjob: Run) -> None:
    kjob(*CREATE)
    assert kjob("disable", "weekly-audit", "--note", "audit tool down").stdout == "disabled weekly-audit\n"
    data = json.loads(kjob("inspect", "weekly-audit", "-o", "json").stdout)
    assert data["enabled"] is False and data["paused_note"] == "audit tool down" and data["next_fires"] == []
    assert "audit tool down" in kjob("inspect", "weekly-audit").stdout
    enabled = kjob("enable", "weekly-audit")
    assert enabled.exit_code == 0 and enabled.stdout.startswith("enabled weekly-audit; next fire 20")
    [job] = jobs_json(kjob)
    assert job["enabled"] is True and job["paused_note"] is None


def test_delete_asks_and_no_changes_nothing(kjob: Run) -> None:
    kjob(*CREATE)
    refused = kjob("delete", "weekly-audit", input="n\n")
    assert refused.exit_code == 1 and "not deleted" in refused.stdout
    assert [j["slug"] for j in jobs_json(kjob)] == ["weekly-audit"]
    no_answer = kjob("delete", "weekly-audit", input="")  # EOF, e.g. in a script without --yes
    assert no_answer.exit_code != 0
    assert [j["slug"] for j in jobs_json(kjob)] == ["weekly-audit"]
    accepted = kjob("delete", "weekly-audit", input="y\n")
    assert accepted.exit_code == 0 and "deleted weekly-audit" in accepted.stdout
    assert jobs_json(kjob) == []


def test_delete_yes_does_not_ask(kjob: Run) -> None:
    kjob(*CREATE)
    result = kjob("delete", "weekly-audit", "--yes")
    assert result.exit_code == 0 and result.stdout == "deleted weekly-audit\n"
    assert jobs_json(kjob) == []


def test_missing_job_is_one_line(kjob: Run) -> None:
    for args in (["inspect", "ghost"], ["enable", "ghost"], ["disable", "ghost"], ["delete", "ghost", "--yes"]):
        assert "'ghost'" in one_line_error(kjob(*args))


def test_taken_slug_is_one_line(kjob: Run) -> None:
    kjob(*CREATE)
    assert "already exists" in one_line_error(kjob(*CREATE))


#: Invariant 4 through `kjob create`: the changed option and the field the error names.
INVALID_CREATE = [
    ("invalid cron", ["--schedule", "61 * * * *"], "schedule"),
    ("unknown zone", ["--tz", "Mars/Olympus_Mons"], "timezone"),
    ("unknown agent", ["--agent", "nobody"], "agent"),
    ("undeliverable channel", ["--output", "kode-chat:user-1"], "output.channel"),
    ("bad slug", ["--slug", "Weekly Audit!"], "slug"),
    ("empty prompt", ["--prompt", "  "], "prompt"),
    ("oversized prompt", ["--prompt", "x" * (64 * 1024 + 1)], "prompt"),
    ("bad duration", ["--timeout", "30 minutes"], "timeout"),
    ("once in the past", ["--schedule", "@once 2020-01-01T09:00Z"], "schedule"),
    ("bad sandbox", ["--sandbox", "vm"], "sandbox"),
    ("docker without image", ["--sandbox", "docker"], "sandbox.image"),
    ("bad backoff", ["--backoff", "linear"], "retries.backoff"),
]


@pytest.mark.parametrize("name,args,field", INVALID_CREATE, ids=[c[0] for c in INVALID_CREATE])
def test_create_refuses_bad_input_and_stores_nothing(kjob: Run, name: str, args: list[str], field: str) -> None:
    one_line_error(kjob(*CREATE, *args), field)  # later options win over CREATE's
    assert jobs_json(kjob) == []


JOBS_FILE = """
[[job]]
slug     = "weekly-stack-audit"
prompt   = "/k-housekeep"
agent    = "kode"
schedule = "0 9 * * MON"
sandbox  = { backend = "docker", image = "koder-cli:latest" }
output   = { channel = "none" }
retries  = { max = 3, backoff = "exponential" }
timeout  = "30m"
enabled  = true

[[job]]
slug     = "health-probe"
prompt   = "curl -fsS https://example.test/health"
agent    = "shell"
schedule = "*/5 * * * *"
"""


def test_apply_is_idempotent(kjob: Run, tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(JOBS_FILE)
    first = kjob("apply", "-f", str(path))
    assert first.exit_code == 0, first.output
    assert first.stdout.split() == ["created", "weekly-stack-audit", "created", "health-probe"]
    again = kjob("apply", "-f", str(path), "-o", "json")
    assert json.loads(again.stdout) == [
        {"slug": "weekly-stack-audit", "action": "unchanged"},
        {"slug": "health-probe", "action": "unchanged"},
    ]
    before = {j["slug"]: j["updated_at"] for j in jobs_json(kjob)}
    path.write_text(JOBS_FILE.replace("*/5 * * * *", "*/10 * * * *"))
    third = kjob("apply", "--file", str(path))
    assert third.stdout.split() == ["unchanged", "weekly-stack-audit", "updated", "health-probe"]
    after = {j["slug"]: j for j in jobs_json(kjob)}
    assert after["health-probe"]["schedule"] == "*/10 * * * *"
    assert after["weekly-stack-audit"]["updated_at"] == before["weekly-stack-audit"]


def test_apply_reads_stdin(kjob: Run) -> None:
    result = kjob("apply", "-f", "-", input=JOBS_FILE)
    assert result.exit_code == 0, result.output
    assert sorted(j["slug"] for j in jobs_json(kjob)) == ["health-probe", "weekly-stack-audit"]


@pytest.mark.parametrize(
    "text,field",
    [
        ("[[job]]\nslug = 'a'\nprompt = 'unterminated", None),  # malformed TOML
        (JOBS_FILE.replace('schedule = "*/5 * * * *"', 'schedule = "*/5 * * *"'), "job[2].schedule"),
        (JOBS_FILE.replace('agent    = "shell"', 'agent    = "nobody"'), "job[2].agent"),  # the server's check
        (JOBS_FILE.replace('channel = "none"', 'channel = "kode-chat:ops"'), "job[1].output.channel"),
        (JOBS_FILE.replace('schedule = "*/5 * * * *"', 'schedule = "@once 2020-01-01T00:00Z"'), "job[2].schedule"),
        ("", "job"),  # no job at all
        (JOBS_FILE.replace('prompt   = "curl -fsS https://example.test/health"\n', ""), "job[2].prompt"),
        (JOBS_FILE.replace('timeout  = "30m"', 'timeout  = "30 minutes"'), "job[1].timeout"),
        (JOBS_FILE + "bogus = 1\n", "job[2].bogus"),
        (JOBS_FILE + "sandbox = { cpus = inf }\n", "job[2].sandbox.cpus"),  # no JSON for it: refused here
        (JOBS_FILE + "description = 2026-05-15\n", "job[2].description"),  # a TOML date, neither
        (JOBS_FILE + 'description = "a\\u0000b"\n', "job[2].description"),  # NUL, through an escape
        (JOBS_FILE + JOBS_FILE.split("[[job]]")[2].join(["[[job]]", ""]), "job[3].slug"),  # a slug twice
    ],
    ids=["malformed toml", "bad cron", "unknown agent", "undeliverable channel", "once in the past", "empty file",
         "missing prompt", "bad duration", "unknown field", "infinite cpus", "date for text", "NUL",
         "slug twice"],
)
def test_a_bad_file_changes_nothing(kjob: Run, tmp_path: Path, text: str, field: str | None) -> None:
    kjob("create", "--slug", "health-probe", "--prompt", "old", "--schedule", "@hourly", "--agent", "shell")
    before = jobs_json(kjob)
    path = tmp_path / "jobs.toml"
    path.write_text(text)
    one_line_error(kjob("apply", "-f", str(path)), field)
    assert jobs_json(kjob) == before


@pytest.mark.parametrize(
    "old,new,field,says",
    [
        ('agent    = "shell"', 'agent    = "nobody"', "job[2].agent", "job 'health-probe': unknown agent 'nobody'"),
        ('prompt   = "curl -fsS https://example.test/health"\n', "", "job[2].prompt",
         "job 'health-probe': prompt is required"),
        ('schedule = "0 9 * * MON"', 'schedule = "0 9 * *"', "job[1].schedule",
         "job 'weekly-stack-audit': '0 9 * *': a cron expression has 5 fields"),
    ],
    ids=["a check of the server's", "a missing field", "a bad value"],
)
def test_a_bad_job_is_named_by_file_job_and_field(
        kjob: Run, tmp_path: Path, old: str, new: str, field: str, says: str) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(JOBS_FILE.replace(old, new))
    assert one_line_error(kjob("apply", "-f", str(path)), field).startswith(f"error: {field}: {path}: {says}")
    # from stdin: no file to name
    assert one_line_error(kjob("apply", "-f", "-", input=path.read_text()), field).startswith(f"error: {field}: {says}")
    assert jobs_json(kjob) == []


@pytest.mark.parametrize("header,path", [("[job]", "job"), ("[[job]]", "job[1]")])
def test_a_file_of_one_job_names_it_as_written(kjob: Run, tmp_path: Path, header: str, path: str) -> None:
    file = tmp_path / "one.toml"
    file.write_text(f'{header}\nslug = "one"\nprompt = "p"\nagent = "nobody"\nschedule = "@daily"\n')
    one_line_error(kjob("apply", "-f", str(file)), f"{path}.agent")  # the server's check
    file.write_text(f'{header}\nslug = "one"\nprompt = "p"\nagent = "shell"\nschedule = "@daily"\nbogus = 1\n')
    one_line_error(kjob("apply", "-f", str(file)), f"{path}.bogus")  # the model's


def test_apply_of_a_missing_file_is_one_line(kjob: Run, tmp_path: Path) -> None:
    assert "nope.toml" in one_line_error(kjob("apply", "-f", str(tmp_path / "nope.toml")))
