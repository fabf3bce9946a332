"""Job validation (invariant 4): every bad field is refused with a message naming it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from kjob.errors import InvalidInput
from kjob.model.job import JobSpec, RetryPolicy, merge_job, parse_job

GOOD: dict[str, Any] = {"slug": "weekly-audit", "prompt": "/k-housekeep", "agent": "kode", "schedule": "0 9 * * MON"}


def refused(**changes: Any) -> InvalidInput:
    with pytest.raises(InvalidInput) as e:
        parse_job({**GOOD, **changes})
    return e.value


def test_a_minimal_job_gets_the_documented_defaults() -> None:
    spec = parse_job(GOOD)
    assert spec.timezone == "UTC" and spec.enabled
    assert spec.sandbox.backend == "process" and spec.output.channel == "none"
    assert spec.timeout == timedelta(minutes=30)
    assert spec.retries.max == 0 and spec.catchup.policy == "latest"


def test_schedule_whitespace_is_normalised_on_the_way_in() -> None:
    assert parse_job({**GOOD, "schedule": " 0  9 * *  MON "}).schedule == "0 9 * * MON"


@pytest.mark.parametrize("slug", ["a", "weekly-audit", "0day", "a" * 63, "x-1-y"])
def test_good_slugs(slug: str) -> None:
    assert parse_job({**GOOD, "slug": slug}).slug == slug


@pytest.mark.parametrize("slug", ["", "-lead", "Upper", "under_score", "a" * 64, "has space", "dot.ted", "abc\n", "ünï"])
def test_bad_slugs(slug: str) -> None:
    e = refused(slug=slug)
    assert e.field == "slug"
    assert "use 1-63 lowercase letters, digits and '-'" in e.message


def test_prompt_must_have_text_and_fit_in_64_kib() -> None:
    assert refused(prompt="").field == "prompt"
    e = refused(prompt=" \n\t ")
    assert (e.field, e.message) == ("prompt", "the prompt cannot be empty")
    parse_job({**GOOD, "prompt": "x" * 65536})
    e = refused(prompt="x" * 65537)
    assert (e.field, e.message) == ("prompt", "the prompt is 65537 bytes; the limit is 64 KiB")
    # the limit is in bytes, as stored and sent, not characters
    e = refused(prompt="é" * 32769)
    assert e.field == "prompt" and "65538 bytes" in e.message


@pytest.mark.parametrize("timeout", ["45s", "30m", "2h", "1h30m", "24h"])
def test_timeouts_people_write(timeout: str) -> None:
    parse_job({**GOOD, "timeout": timeout})


@pytest.mark.parametrize(
    ("timeout", "message"),
    [
        ("25h", "the timeout can be at most 24h"),
        ("1d1s", "the timeout can be at most 24h"),
        ("0s", "the timeout must be positive"),
        ("soon", "'soon' is not a duration"),
        ("99999999999999d", "too long a duration"),
    ],
)
def test_bad_timeouts(timeout: str, message: str) -> None:
    e = refused(timeout=timeout)
    assert e.field == "timeout" and message in e.message


def test_unknown_timezone() -> None:
    e = refused(timezone="Mars/Olympus_Mons")
    assert e.field == "timezone"
    assert e.message == "unknown time zone 'Mars/Olympus_Mons'; use an IANA name such as 'UTC' or 'Europe/Berlin'"
    assert refused(timezone="").field == "timezone"
    assert refused(timezone="../../etc/passwd").field == "timezone"
    assert parse_job({**GOOD, "timezone": "Australia/Lord_Howe"}).timezone == "Australia/Lord_Howe"


def test_bad_schedule_is_the_schedule_message() -> None:
    e = refused(schedule="61 * * * *")
    assert (e.field, e.message) == ("schedule", "'61 * * * *': minute 61 is out of range 0-59")


def test_docker_needs_an_image() -> None:
    e = refused(sandbox={"backend": "docker"})
    assert e.field == "sandbox.image"
    assert 'image = "koder-cli:latest"' in e.message
    assert refused(sandbox={"backend": "docker", "image": ""}).field == "sandbox.image"
    assert parse_job({**GOOD, "sandbox": {"backend": "docker", "image": "koder-cli:latest"}}).sandbox.image == "koder-cli:latest"


def test_unknown_backend_and_unknown_sandbox_field() -> None:
    assert refused(sandbox={"backend": "vm"}).field == "sandbox.backend"
    e = refused(sandbox={"backend": "process", "gpu": True})
    assert (e.field, e.message) == ("sandbox.gpu", "is not a job field")


@pytest.mark.parametrize(
    ("channel", "message"),
    [
        ("", "channel cannot be empty; use 'none' to only store results"),
        ("   ", "channel cannot be empty"),
        ("webhook:ftp://host/x", "a webhook channel is 'webhook:https://host/path'"),
        ("webhook:", "a webhook channel is"),
    ],
)
def test_bad_channels(channel: str, message: str) -> None:
    e = refused(output={"channel": channel})
    assert e.field == "output.channel" and message in e.message


def test_good_channels() -> None:
    for channel in ("none", "kode-chat:user-rpm32510", "webhook:https://hooks.example.com/x"):
        assert parse_job({**GOOD, "output": {"channel": channel}}).output.channel == channel


def test_bad_agent_name() -> None:
    assert refused(agent="rm -rf /").field == "agent"
    assert refused(agent="kode\n").field == "agent"


def test_missing_and_unknown_fields_are_named() -> None:
    data = dict(GOOD)
    del data["prompt"]
    with pytest.raises(InvalidInput) as e:
        parse_job(data)
    assert (e.value.field, e.value.message) == ("prompt", "is required")
    e2 = refused(promt="typo")
    assert (e2.field, e2.message) == ("promt", "is not a job field")


def test_retries_are_bounded() -> None:
    assert refused(retries={"max": -1}).field == "retries.max"
    assert refused(retries={"max": 21}).field == "retries.max"
    assert refused(retries={"backoff": "linear"}).field == "retries.backoff"
    assert refused(retries={"initial_delay": "soon"}).field == "retries.initial_delay"


def test_a_job_that_is_not_a_table() -> None:
    with pytest.raises(InvalidInput, match="a job must be an object/table of fields"):
        parse_job(["slug", "x"])  # type: ignore[arg-type]


def test_merge_changes_nested_fields_one_by_one_and_revalidates() -> None:
    spec = parse_job({**GOOD, "sandbox": {"backend": "docker", "image": "a:1"}})
    merged = merge_job(spec, {"sandbox": {"image": "b:2"}, "timeout": "1h"})
    assert merged.sandbox.backend == "docker" and merged.sandbox.image == "b:2"
    assert merged.timeout == timedelta(hours=1) and merged.slug == spec.slug
    with pytest.raises(InvalidInput) as e:
        merge_job(spec, {"schedule": "@every 0s"})
    assert e.value.field == "schedule"


def test_specs_are_immutable() -> None:
    spec = parse_job(GOOD)
    with pytest.raises(ValidationError):
        spec.slug = "other"  # type: ignore[misc]
    assert isinstance(spec, JobSpec)


# --- retry backoff -------------------------------------------------------------------------


def test_exponential_backoff_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(max=5, initial_delay=timedelta(seconds=10), max_delay=timedelta(seconds=60))
    assert [policy.delay(a).total_seconds() for a in range(1, 6)] == [10, 20, 40, 60, 60]


def test_fixed_backoff_waits_the_same_each_time() -> None:
    policy = RetryPolicy(max=3, backoff="fixed", initial_delay=timedelta(seconds=30))
    assert {policy.delay(a) for a in (1, 2, 3)} == {timedelta(seconds=30)}
    capped = RetryPolicy(backoff="fixed", initial_delay=timedelta(minutes=20), max_delay=timedelta(minutes=5))
    assert capped.delay(1) == timedelta(minutes=5)


def test_backoff_written_as_text_in_a_job() -> None:
    spec = parse_job({**GOOD, "retries": {"max": 3, "initial_delay": "1m", "max_delay": "5m"}})
    assert spec.retries.delay(1) == timedelta(minutes=1)
    assert spec.retries.delay(4) == timedelta(minutes=5)
