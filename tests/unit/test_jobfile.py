"""Job files (RFC section 5): what loads, what is refused and how, and dumps that load back."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from kjob.errors import JobFileError
from kjob.model.job import parse_job
from kjob.model.jobfile import dump_job, dump_jobs, load_job_tables, load_jobs, load_jobs_file

#: RFC-001 section 5, verbatim.
RFC_EXAMPLE = """\
[job]
slug         = "weekly-stack-audit"
prompt       = "/k-housekeep"
agent        = "kode"               # or "kortex", "custom-agent-id"
schedule     = "0 9 * * MON"        # cron expr; or "@once 2026-05-15T10:00Z"
sandbox      = { backend = "docker", image = "koder-cli:latest" }
output       = { channel = "kode-chat:user-rpm32510" }
retries      = { max = 3, backoff = "exponential" }
timeout      = "30m"
enabled      = true
"""

TWO_JOBS = """\
[[job]]
slug = "nightly-report"
prompt = "Summarise yesterday's incidents"
agent = "kode"
schedule = "30 2 * * *"
timezone = "America/New_York"

[[job]]
slug = "probe"
prompt = "curl -fsS https://status.example.com"
agent = "shell"
schedule = "@every 5m"
"""


def refused(text: str) -> JobFileError:
    with pytest.raises(JobFileError) as e:
        load_jobs(text)
    assert "\n" not in str(e.value)
    return e.value


def test_the_rfc_example_loads_as_is() -> None:
    [job] = load_jobs(RFC_EXAMPLE)
    assert (job.slug, job.prompt, job.agent, job.schedule) == ("weekly-stack-audit", "/k-housekeep", "kode", "0 9 * * MON")
    assert (job.sandbox.backend, job.sandbox.image) == ("docker", "koder-cli:latest")
    assert job.output.channel == "kode-chat:user-rpm32510"
    assert (job.retries.max, job.retries.backoff) == (3, "exponential")
    assert job.timeout == timedelta(minutes=30) and job.enabled


def test_several_jobs_load_in_file_order() -> None:
    jobs = load_jobs(TWO_JOBS)
    assert [j.slug for j in jobs] == ["nightly-report", "probe"]
    assert jobs[0].timezone == "America/New_York" and jobs[1].schedule == "@every 5m"


def test_a_bad_job_names_the_job_and_the_field() -> None:
    e = refused(TWO_JOBS.replace('"@every 5m"', '"61 * * * *"'))
    assert e.field == "job[2].schedule"
    assert e.message == "job 'probe': '61 * * * *': minute 61 is out of range 0-59"
    e = refused(RFC_EXAMPLE.replace('timeout      = "30m"', 'timeout = "25h"'))
    assert (e.field, e.message) == ("job.timeout", "job 'weekly-stack-audit': the timeout can be at most 24h")
    e = refused(RFC_EXAMPLE.replace(', image = "koder-cli:latest"', ""))
    assert e.field == "job.sandbox.image"


def test_a_job_without_a_usable_slug_is_named_by_its_place() -> None:
    e = refused('[[job]]\nslug = "ok"\nprompt = "p"\nagent = "kode"\nschedule = "@daily"\n[[job]]\nprompt = "p"\n')
    assert (e.field, e.message) == ("job[2].slug", "job[2]: slug is required")


def test_duplicate_slugs_in_one_file_are_refused() -> None:
    e = refused(TWO_JOBS.replace('slug = "probe"', 'slug = "nightly-report"'))
    assert e.field == "job[2].slug"
    assert e.message == "slug 'nightly-report' is already used by job[1]; each job in a file needs its own slug"


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("[job\nslug = 1", None, "not valid TOML: "),
        ('slug = "x"', "slug", "unknown top-level key 'slug'; a job file holds one [job] table or several [[job]] tables"),
        ("", "job", "no job in the file; write a [job] table"),
        ("# only a comment\n", "job", "no job in the file"),
        ("job = []", "job", "no job in the file"),
        ('job = "x"', "job", "job must be a [job] table or [[job]] tables"),
        ("job = [1]", "job[1]", "job[1] must be a table of fields"),
        (RFC_EXAMPLE + "colour = 'blue'\n", "job.colour", "job 'weekly-stack-audit': colour is not a job field"),
    ],
)
def test_files_that_are_not_jobs(text: str, field: str | None, message: str) -> None:
    e = refused(text)
    assert e.field == field and message in e.message


def test_load_from_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(TWO_JOBS)
    assert [j.slug for j in load_jobs_file(path)] == ["nightly-report", "probe"]
    assert [j.slug for j in load_jobs_file(str(path))] == ["nightly-report", "probe"]
    path.write_text(TWO_JOBS.replace('"shell"', '"sh ell"'))
    with pytest.raises(JobFileError) as e:
        load_jobs_file(path)
    assert e.value.field == "job[2].agent" and e.value.message.startswith(f"{path}: job 'probe': ")
    with pytest.raises(JobFileError, match="cannot read") as e:
        load_jobs_file(tmp_path / "missing.toml")
    assert e.value.field == "file"
    path.write_bytes(b"\xff\xfe[job]")
    with pytest.raises(JobFileError, match="is not UTF-8 text"):
        load_jobs_file(path)


def test_dump_writes_the_rfc_shape() -> None:
    [job] = load_jobs(RFC_EXAMPLE)
    text = dump_job(job)
    assert text.startswith("[job]\nslug     = \"weekly-stack-audit\"\n")
    assert 'sandbox  = { backend = "docker", image = "koder-cli:latest" }\n' in text
    assert "enabled  = true\n" in text
    assert load_jobs(text) == [job]


def test_every_field_survives_a_round_trip() -> None:
    spec = parse_job({
        "slug": "everything",
        "prompt": 'line one\nsays "hi" \\ with a backslash\ttab\r\nand \x01 control\n"""triple"""',
        "agent": "kode",
        "schedule": "30 0 9 * * MON-FRI",
        "timezone": "Australia/Lord_Howe",
        "sandbox": {"backend": "docker", "image": "koder-cli:latest", "network": "egress", "memory": "512m",
                    "cpus": 1.5, "pids": 64, "env": {"A": "1", "MULTI_LINE": "two\nlines", "UNICODE": "ü \" quotes"},
                    "workdir": "/work", "pull": "if-missing"},
        "output": {"channel": "webhook:https://hooks.example.com/x?a=1&b=\"2\""},
        "retries": {"max": 3, "backoff": "fixed", "initial_delay": "1m30s", "max_delay": "1h"},
        "timeout": "1h30m",
        "catchup": {"window": "2h", "policy": "all"},
        "enabled": False,
        "description": "all the fields",
        "labels": {"team": "ops", "cost-centre": "42", "with.dot": "x"},
    })
    assert load_jobs(dump_job(spec)) == [spec]
    other = parse_job({"slug": "minimal", "prompt": "p", "agent": "kode", "schedule": "@once 2026-05-15T10:00Z"})
    assert load_jobs(dump_jobs([spec, other])) == [spec, other]


def test_dump_jobs_of_one_still_uses_an_array_of_tables() -> None:
    [job] = load_jobs(RFC_EXAMPLE)
    assert dump_jobs([job]).startswith("[[job]]\n")


def test_the_tables_of_a_file_are_its_jobs_as_written_checked_as_a_file() -> None:
    # `kjob apply` has each job checked by the server: its fields pass through unjudged ...
    entries = load_job_tables(TWO_JOBS.replace('"@every 5m"', '"61 * * * *"'))
    assert [path for path, _ in entries] == ["job[1]", "job[2]"]
    assert entries[1][1] == {"slug": "probe", "prompt": "curl -fsS https://status.example.com", "agent": "shell",
                             "schedule": "61 * * * *"}
    assert [path for path, _ in load_job_tables(RFC_EXAMPLE)] == ["job"]
    # ... and what is the file's is refused as `load_jobs` refuses it
    for text, field, message in [
        (TWO_JOBS.replace('"probe"', '"nightly-report"'), "job[2].slug", "slug 'nightly-report' is already used by job[1]"),
        (TWO_JOBS.replace('agent = "shell"', 'agent = "she\\u0000ll"'), "job[2].agent", "job 'probe': holds a NUL"),
        (TWO_JOBS.replace('"nightly-report"', '"night\\u0000ly"'), "job[1].slug", "job 'night\\x00ly': holds a NUL"),
        ("job = 3", "job", "job must be a [job] table"),
        ("[[job]]\n[[job]]\nslug = 'x'\n[other]\n", "other", "unknown top-level key 'other'"),
        ("", "job", "no job in the file"),
    ]:
        with pytest.raises(JobFileError) as e:
            load_job_tables(text)
        assert (e.value.field, e.value.message[:len(message)]) == (field, message)
        with pytest.raises(JobFileError) as same:
            load_jobs(text)
        assert (same.value.field, same.value.message) == (e.value.field, e.value.message)
