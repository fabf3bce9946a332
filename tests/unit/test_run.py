"""Runs: ids, attempt statuses, the retry rule and the message sent to Relay."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from kjob.model.job import RetryPolicy
from kjob.model.run import (
    MAX_BODY_CHARS,
    MAX_LOST_RETRIES,
    RunStatus,
    attempt_status,
    dispatch_payload,
    run_id_for,
    should_retry,
    utc_text,
)

JOB = uuid.UUID("0b0e7b36-6a1f-4d0b-9a57-1d2f3c4b5a69")
SLOT = datetime(2026, 5, 4, 9, 0, tzinfo=timezone.utc)
LOG = "https://kjob.example/v1/runs/3f2a/log"


def test_run_id_is_the_same_for_the_same_slot_on_every_node() -> None:
    assert run_id_for(JOB, SLOT) == run_id_for(JOB, SLOT)
    # the same instant written in another offset is the same slot
    berlin = SLOT.astimezone(timezone(timedelta(hours=2)))
    assert run_id_for(JOB, berlin) == run_id_for(JOB, SLOT)
    assert uuid.UUID(run_id_for(JOB, SLOT)).version == 5


def test_run_ids_differ_per_slot_and_per_job() -> None:
    ids = {run_id_for(JOB, SLOT + timedelta(minutes=m)) for m in range(100)}
    assert len(ids) == 100
    assert run_id_for(uuid.uuid4(), SLOT) != run_id_for(JOB, SLOT)


def test_naive_slots_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        run_id_for(JOB, datetime(2026, 5, 4, 9, 0))


def test_utc_text() -> None:
    assert utc_text(SLOT) == "2026-05-04T09:00:00Z"
    assert utc_text(SLOT.replace(microsecond=250000)) == "2026-05-04T09:00:00.250000Z"


@pytest.mark.parametrize(
    ("exit_code", "timed_out", "start_error", "status"),
    [
        (0, False, None, RunStatus.succeeded),
        (1, False, None, RunStatus.failed),
        (137, False, None, RunStatus.failed),
        (None, True, None, RunStatus.timed_out),
        (0, True, None, RunStatus.timed_out),  # output before the kill does not make it a success
        (None, False, "image koder-cli:latest not found", RunStatus.error),
        (None, False, None, RunStatus.failed),  # no exit code at all is not success
    ],
)
def test_only_exit_zero_is_success(exit_code: int | None, timed_out: bool, start_error: str | None, status: RunStatus) -> None:
    assert attempt_status(exit_code, timed_out, start_error) is status


def test_failures_retry_up_to_the_jobs_budget() -> None:
    policy = RetryPolicy(max=2)
    assert [should_retry(RunStatus.failed, a, 0, policy) for a in (1, 2, 3)] == [True, True, False]
    assert should_retry(RunStatus.timed_out, 1, 0, policy)
    assert should_retry(RunStatus.error, 1, 0, policy)
    assert not should_retry(RunStatus.error, 1, 0, policy, permanent=True)  # a missing binary or image
    assert not should_retry(RunStatus.succeeded, 1, 0, policy)
    assert not should_retry(RunStatus.failed, 1, 0, RetryPolicy(max=0))


def test_lost_attempts_do_not_spend_the_budget() -> None:
    no_budget = RetryPolicy(max=0)
    # an executor that dies is retried even with no retries configured, a bounded number of times
    assert [should_retry(RunStatus.lost, n, n, no_budget) for n in range(1, MAX_LOST_RETRIES + 2)] == \
        [True] * MAX_LOST_RETRIES + [False]
    # attempt 2 failed after attempt 1 was lost: it is the first real failure
    assert should_retry(RunStatus.failed, 2, 1, RetryPolicy(max=1))
    assert not should_retry(RunStatus.failed, 3, 1, RetryPolicy(max=1))


def test_relay_message_matches_rfc_section_7() -> None:
    body = dispatch_payload("weekly-stack-audit", "kode-chat:user-rpm32510", RunStatus.succeeded, "all good\n", LOG)
    assert body == {
        "channel": "kode-chat:user-rpm32510",
        "message": {
            "title": "[weekly-stack-audit] completed",
            "body": f"all good\n\n\nFull log: {LOG}",
            "status": "success",
        },
    }


@pytest.mark.parametrize(
    ("status", "word", "relay"),
    [
        (RunStatus.failed, "failed", "failed"),
        (RunStatus.error, "failed", "failed"),
        (RunStatus.lost, "failed", "failed"),
        (RunStatus.timed_out, "timeout", "timeout"),
    ],
)
def test_unfinished_runs_never_report_success(status: RunStatus, word: str, relay: str) -> None:
    msg = dispatch_payload("s", "c", status, "", LOG)["message"]
    assert msg["title"] == f"[s] {word}" and msg["status"] == relay


def test_long_output_is_cut_so_the_body_with_its_log_link_fits() -> None:
    stdout = "x" * 10_000
    body = dispatch_payload("s", "c", RunStatus.failed, stdout, LOG)["message"]["body"]
    assert len(body) == MAX_BODY_CHARS
    assert body.endswith(f"…\n\nFull log: {LOG}")
    exact = "y" * (MAX_BODY_CHARS - len(f"\n\nFull log: {LOG}"))
    assert dispatch_payload("s", "c", RunStatus.failed, exact, LOG)["message"]["body"] == f"{exact}\n\nFull log: {LOG}"
