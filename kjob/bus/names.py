"""Every NATS name kjob uses: streams, subjects, consumers, KV buckets. Nothing else spells them.

Subjects are `kjob.<kind>.<tenant>...`, so a NATS account or user can be limited to one
tenant with a wildcard (`kjob.*.acme.>`).
"""

from __future__ import annotations

#: Due runs: the ticker publishes, executors consume (work queue: each message to one executor).
RUNS_STREAM = "KJOB_RUNS"
RUN_DUE_ALL = "kjob.run.due.>"

#: Finished runs: executors publish, dispatchers consume.
RESULTS_STREAM = "KJOB_RESULTS"
RUN_RESULT_ALL = "kjob.run.result.>"

#: Events for other services (job changed, run started/finished/dispatched). Limits retention.
EVENTS_STREAM = "KJOB_EVENTS"
EVENT_ALL = "kjob.event.>"

#: Live agent output, one subject per run, kept a day so `kjob logs -f` can start from the top.
LOGS_STREAM = "KJOB_LOGS"
LOG_ALL = "kjob.log.>"

EXECUTOR_CONSUMER = "kjob-executor"
DISPATCHER_CONSUMER = "kjob-dispatcher"

#: Nodes heard from recently (KV bucket, one key per node), for `kjob status`.
NODES_BUCKET = "kjob_nodes"

#: Ticker leadership lease (KV bucket).
LEADER_BUCKET = "kjob_leader"
LEADER_KEY = "ticker"

#: JetStream's de-duplication key (within the stream's duplicate window).
HDR_MSG_ID = "Nats-Msg-Id"
# Headers carried by every message, so a run is one trace and its logs correlate.
HDR_RUN_ID = "Kjob-Run-Id"
HDR_TENANT = "Kjob-Tenant"
#: A run's live log line: `stdout` or `stderr`, and `end` (with `Kjob-Attempt`) after its last.
HDR_STREAM = "Kjob-Stream"
HDR_ATTEMPT = "Kjob-Attempt"
#: A due run published ahead of its instant (the ticker's look-ahead): epoch seconds before
#: which no executor starts it (kjob.bus.hold).
HDR_NOT_BEFORE = "Kjob-Not-Before"
#: ... and how long before it the ticker published it, ms: the longest an executor holds it.
HDR_HOLD_MS = "Kjob-Hold-Ms"


def run_due(tenant: str) -> str:
    return f"kjob.run.due.{tenant}"


def run_result(tenant: str) -> str:
    return f"kjob.run.result.{tenant}"


def event(tenant: str, kind: str) -> str:
    """kind: job_changed | run_started | run_finished | run_dispatched."""
    return f"kjob.event.{tenant}.{kind}"


def run_log(tenant: str, run_id: str) -> str:
    return f"kjob.log.{tenant}.{run_id}"


def run_headers(run_id: str, tenant: str) -> dict[str, str]:
    return {HDR_RUN_ID: run_id, HDR_TENANT: tenant}


def due_msg_id(run_id: str, *, backfill: bool = False, republished_at: int | None = None) -> str:
    """The run id. A backfill's `<run id>.backfill`: it may run a slot whose own due message was
    just published and skipped, which the stream would drop as a duplicate. A re-publish of a
    run whose message vanished, `<run id>.re<epoch s>`, for the same reason."""
    if republished_at is not None:
        return f"{run_id}.re{republished_at}"
    return f"{run_id}.backfill" if backfill else run_id


def result_msg_id(run_id: str, notice: str | None = None) -> str:
    """`<run id>.result`, or `<run id>.<notice>` for a notice about the run's job."""
    return f"{run_id}.{notice or 'result'}"
