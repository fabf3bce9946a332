"""Runs: their statuses, ids, retry rule and the Relay message built from them. Pure."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict

from kjob.model.job import RetryPolicy

#: uuid5 namespace for run ids, so a slot's run id is the same on every node and every retry
#: of the ticker: it doubles as the `Nats-Msg-Id` and the Relay `Idempotency-Key`.
RUN_NAMESPACE = uuid.UUID("6f1d4c1e-8a3b-5b9e-9c53-2a7c0e6b4d11")

#: Relay's body is capped so a chatty agent cannot flood a chat channel (RFC section 7).
MAX_BODY_CHARS = 4000


class RunStatus(str, enum.Enum):
    """Where a run is. FINAL_STATUSES (all but scheduled, running, retrying, lost) are final;
    `missed` and `skipped` never ran."""

    scheduled = "scheduled"  #: in the ledger, due message published or about to be
    running = "running"  #: claimed by an executor, which heartbeats its claim
    retrying = "retrying"  #: an attempt failed and another is due after the backoff
    succeeded = "succeeded"  #: the agent exited 0
    failed = "failed"  #: the agent exited non-zero (exit code kept)
    timed_out = "timed_out"  #: killed at the job's timeout
    error = "error"  #: the sandbox or agent could not start
    lost = "lost"  #: the executor died mid-attempt; the run is retried
    missed = "missed"  #: a slot that will not run (downtime past the catch-up rule); reason kept
    skipped = "skipped"  #: a slot not run by policy (overlap, disabled); reason kept
    cancelled = "cancelled"  #: stopped by the overlap policy `replace` ("replaced by run <id>"); no retry
    budget_exceeded = "budget_exceeded"  #: stopped at the job's `limits` (the figure in `reason`); no retry

    @property
    def final(self) -> bool:
        return self in FINAL_STATUSES


class MissReason(enum.StrEnum):
    """Why a slot will not run (`missed`, `skipped`, or never written): the code the ledger keeps
    in `reason_code` (and the API shows), and the label its count carries
    (kjob.telemetry.metrics.slots_missed). Codes are for programs; the `reason` column keeps the
    sentence a person reads (kjob.model.catchup, kjob.model.policies), which names the window,
    the policy or the run in the way."""

    outside_catchup_window = "outside_catchup_window"  #: late, and older than the job's catch-up window
    catchup_policy = "catchup_policy"  #: late, inside the window, and not the slot the catch-up policy runs
    #: skipped as it came to start: the job's previous run still ran (overlap `skip`)
    overlap = "overlap"
    #: the job was deleted or disabled before its slot ran: as the slot was written (the slot is
    #: not written, only counted) or as it came to start (`skipped`)
    job_gone = "job_gone"
    unwritable = "unwritable"  #: the ledger refused the slot's row for good (a data or constraint error)
    cost_cap = "cost_cap"  #: skipped: the tenant's agents spent its daily cost cap


FINAL_STATUSES = frozenset(
    {RunStatus.succeeded, RunStatus.failed, RunStatus.timed_out, RunStatus.error,
     RunStatus.missed, RunStatus.skipped, RunStatus.cancelled, RunStatus.budget_exceeded}
)


class DeliveryStatus(str, enum.Enum):
    """Delivery of a finished run's result, kept apart from the run's own status."""

    pending = "pending"  #: the run has not finished, or its result waits for the dispatcher
    delivered = "delivered"  #: Relay (or the webhook) answered 2xx
    failed = "failed"  #: Relay answered 4xx, or retries ran out; `delivery_error` says why
    none = "none"  #: the job's channel is `none`: results are stored only
    suppressed = "suppressed"  #: not sent by the job's notify policy or quiet marker; `delivery_error` says why


class Trigger(str, enum.Enum):
    """Why a run exists."""

    schedule = "schedule"
    catchup = "catchup"
    manual = "manual"
    backfill = "backfill"


def run_id_for(job_id: uuid.UUID, slot: datetime) -> str:
    """The run id of one slot of one job: deterministic, so every retry of publishing agrees."""
    return str(uuid.uuid5(RUN_NAMESPACE, f"{job_id}/{to_utc(slot).isoformat()}"))


def to_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("naive datetime: kjob only handles aware instants")
    return moment.astimezone(timezone.utc)


def utc_text(moment: datetime) -> str:
    """`YYYY-MM-DDTHH:MM:SSZ` (with `.ffffff` only when there are sub-seconds)."""
    m = to_utc(moment)
    if m.microsecond:
        return m.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return m.strftime("%Y-%m-%dT%H:%M:%SZ")


def attempt_status(exit_code: int | None, timed_out: bool, start_error: str | None) -> RunStatus:
    """The status of one finished attempt. Only exit code 0 is success (invariant 6)."""
    if start_error is not None:
        return RunStatus.error
    if timed_out:
        return RunStatus.timed_out
    return RunStatus.succeeded if exit_code == 0 else RunStatus.failed


#: A lost attempt (executor died) is retried this many times even when the job's own retry
#: budget is spent: the agent did nothing wrong, its host did.
MAX_LOST_RETRIES = 2


def should_retry(status: RunStatus, attempt: int, lost_attempts: int, policy: RetryPolicy,
                 permanent: bool = False) -> bool:
    """Whether attempt number `attempt` (1-based) ending in `status` gets another try.
    `permanent`: the attempt could not start, and waiting will not change that."""
    if status in (RunStatus.succeeded, RunStatus.budget_exceeded) or permanent:
        return False  # another try of an agent over its budget would spend it again
    if status is RunStatus.lost:
        return lost_attempts <= MAX_LOST_RETRIES or attempt <= policy.max
    return (attempt - lost_attempts) <= policy.max


RELAY_STATUS = {
    RunStatus.succeeded: ("completed", "success"),
    RunStatus.failed: ("failed", "failed"),
    RunStatus.error: ("failed", "failed"),
    RunStatus.lost: ("failed", "failed"),
    RunStatus.timed_out: ("timeout", "timeout"),
    RunStatus.budget_exceeded: ("stopped at its budget", "failed"),
    RunStatus.skipped: ("skipped", "failed"),  # only the cost-cap alert is sent for a skipped run
}


def run_page_url(base: str, run_id: str) -> str:
    """The "Full log" link of a run: its dashboard page, which asks a browser to log in first."""
    return f"{base.rstrip('/')}/ui/runs/{run_id}"


def dispatch_payload(slug: str, channel: str, status: RunStatus, stdout: str, log_url: str) -> dict[str, Any]:
    """The body of Relay's `POST /v1/dispatch` (RFC section 7) for a finished run."""
    word, relay_status = RELAY_STATUS.get(status, ("failed", "failed"))
    link = f"\n\nFull log: {log_url}"
    room = MAX_BODY_CHARS - len(link)
    text = stdout if len(stdout) <= room else stdout[: max(room - 1, 0)] + "…"
    return {
        "channel": channel,
        "message": {
            "title": f"[{slug}] {word}",
            "body": text + link,
            "status": relay_status,
        },
    }


class Run(BaseModel):
    """One row of the run ledger, as the API and CLI show it."""

    model_config = ConfigDict(frozen=True)

    id: str
    job_id: uuid.UUID
    tenant: str
    slug: str
    slot: datetime
    trigger: Trigger
    status: RunStatus
    reason: str | None = None
    #: Why a `missed` or `skipped` run did not run, as a code; `reason` says it in prose.
    reason_code: MissReason | None = None
    attempt: int = 0
    #: Attempts whose executor died; they are retried beyond the job's own budget.
    lost_attempts: int = 0
    created_at: datetime | None = None
    published_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    next_attempt_at: datetime | None = None
    exit_code: int | None = None
    error: str | None = None
    output_excerpt: str | None = None
    output_bytes: int | None = None
    delivery_status: DeliveryStatus = DeliveryStatus.pending
    delivery_attempts: int = 0
    delivery_error: str | None = None
    delivered_at: datetime | None = None
    #: The overlap policy this run starts under when not the job's own (a backfill's choice).
    overlap: str | None = None

    def duration(self) -> float | None:
        """Seconds from the last attempt's start to the end; None until finished."""
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None


class Attempt(BaseModel):
    model_config = ConfigDict(frozen=True)

    attempt: int
    executor: str | None = None
    status: RunStatus
    started_at: datetime
    finished_at: datetime | None = None
    exit_code: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class AgentEnd:
    """An attempt's agent ran to its end while its executor could not record it (paused or
    dead): its watchdog wrote the exit code down. The executor that takes the claim over
    concludes the attempt from this, and never runs the agent again."""

    exit_code: int
    node: str | None
    ended_at: datetime | None

    @property
    def reason(self) -> str:
        return (f"the agent ran to its end on {self.node or 'its node'} (exit code {self.exit_code}) while its "
                "executor was paused or had died; its output was lost with that executor")


#: How many leading characters of a run id tables show, and the fewest a prefix may have:
#: like git's short hashes, any unambiguous prefix of at least MIN_RUN_ID_PREFIX names a run.
SHORT_RUN_ID = 8
MIN_RUN_ID_PREFIX = 4


def run_id_prefix(text: str) -> str | None:
    """`text` as the start of a run id (lowercased), or None when it cannot be one: too short,
    a whole id already, or characters no run id has (ids are UUIDs: hex digits and '-')."""
    prefix = text.lower()
    if not MIN_RUN_ID_PREFIX <= len(prefix) < 36 or prefix.strip("0123456789abcdef-"):
        return None
    return prefix
