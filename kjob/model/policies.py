"""Per-job scheduling policies: their vocabulary and the maths the pipeline shares. Pure.

The policies are JobSpec fields (`kjob.model.job`); this module says what their values mean
and computes what the ticker, executor, dispatcher and gateway need from them:

- `overlap`: what a run does when it comes while another run of the same job is still going
  (its status is `running` or `retrying`). The executor decides, when it claims the run;
- `jitter`: a deterministic delay per (job, slot) before the ticker publishes the slot;
- backfill: the slots of a past range, within a limit per request;
- `pause_after_failures`: the note a paused job gets and the alert its channel receives.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from typing import Any, Final, Literal, get_args
from uuid import UUID

from kjob.errors import InvalidInput
from kjob.model.schedule import Schedule

#: What a run does when it comes while the previous run of its job is still going:
#:
#: - `skip` (default): the new run is not started; the ledger records it `skipped`, with the
#:   reason "previous run <id> still running". Kubernetes' `Forbid`, Temporal's `SKIP`.
#:   The runs of a backfill and of catch-up are each asked for (a range, the catch-up rule):
#:   under `skip` they wait for one another, and for a run still going, as under `queue`, so
#:   a backfill of 3 slots runs 3, one after another. A slot recorded `skipped` (or `missed`)
#:   never ran: a backfill may run it.
#: - `queue`: the new run waits until no other run of the job is going, then starts. Every
#:   waiting run is kept (Temporal's `BUFFER_ALL`, not `BUFFER_ONE`) and they start one at a
#:   time in slot order, so a backfill under `queue` replays its range in order.
#: - `allow`: runs overlap freely. Kubernetes' `Allow`, Temporal's `ALLOW_ALL`.
#: - `replace`: the run still going is cancelled (status `cancelled`, reason "replaced by run
#:   <id>", no retry); the new one starts once the old one's sandbox has stopped, or once its
#:   executor's claim expires if that executor is gone. Kubernetes' `Replace`, Temporal's
#:   `CANCEL_OTHER`.
OverlapPolicy = Literal["skip", "queue", "allow", "replace"]
OVERLAP_POLICIES: Final[tuple[str, ...]] = get_args(OverlapPolicy)

#: Jitter is capped by the job's field check; the gap to the next slot caps it again.
MAX_JITTER = timedelta(hours=24)
#: A slot's delay is at most this share of the gap to the job's next slot, so jitter never
#: pushes a slot past the next one (nor makes two slots of one job fire together).
JITTER_GAP_SHARE = 0.5

#: Slots one backfill request may add; a longer range is split by the caller.
MAX_BACKFILL_SLOTS = 1000
#: The first instant a backfill may start at: before it, computations near datetime.min overflow.
EARLIEST_BACKFILL = datetime(1970, 1, 1, tzinfo=timezone.utc)

#: A claim that must wait (overlap `queue`, or `replace` waiting for the cancelled run to stop)
#: is handed back to JetStream with a delay growing from the first to the last value below, so
#: a waiting run starts at most DEFER_MAX_S after its turn comes, and a queue of N waiting runs
#: costs about N / DEFER_MAX_S claim attempts a second. (Waking it at once would need the
#: executor to publish due runs, which its NATS user may not: deploy/nats/nats-server.conf.)
DEFER_FIRST_S = 0.5
DEFER_MAX_S = 5.0


def jitter_for(job_id: UUID, slot: datetime, jitter: timedelta, next_slot: datetime | None) -> timedelta:
    """The delay of one slot: the same on every node and every restart for the same (job, slot).

    Uniform in [0, cap), in whole milliseconds, where cap is `jitter`, or `JITTER_GAP_SHARE` of
    the real time to `next_slot` when that is smaller (23 h on a spring-forward day for a daily
    job, 25 h on a fall-back day). So the delayed slot always comes before the next slot.
    Only the publish time moves: the slot, and so the run key, stay the nominal instant.
    """
    if jitter <= timedelta(0):
        return timedelta(0)
    cap = jitter
    if next_slot is not None:
        cap = min(cap, (next_slot - slot) * JITTER_GAP_SHARE)
    cap_ms = int(cap / timedelta(milliseconds=1))
    if cap_ms <= 0:
        return timedelta(0)
    key = f"{job_id}/{slot.astimezone(timezone.utc).isoformat()}".encode()
    draw = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
    return timedelta(milliseconds=draw * cap_ms >> 64)


def fire_time(job_id: UUID, schedule: Schedule, tz: str, slot: datetime, jitter: timedelta) -> datetime:
    """When the ticker fires `slot` of the job: the slot plus its jitter (`jitter_for`)."""
    if jitter <= timedelta(0):
        return slot
    return slot + jitter_for(job_id, slot, jitter, schedule.next_slot(slot, tz))


def defer_delay(deliveries: int) -> float:
    """Seconds before a deferred claim is tried again, after `deliveries` deliveries (1-based)."""
    return min(DEFER_FIRST_S * 2 ** max(deliveries - 1, 0), DEFER_MAX_S)


def skipped_reason(running_run_id: str) -> str:
    return f"previous run {running_run_id} still running"


def replaced_reason(new_run_id: str) -> str:
    return f"replaced by run {new_run_id}"


def backfill_slots(schedule: Schedule, tz: str, start: datetime, end: datetime, now: datetime,
                   limit: int = MAX_BACKFILL_SLOTS) -> list[datetime]:
    """The job's slots from `start` to `end`, both included: what a backfill runs.

    :raises InvalidInput: field `from` or `to`: a naive instant, `start` not before `end`, `end`
        in the future (a backfill replays the past; the ticker runs the future), or more than
        `limit` slots in the range.
    """
    for name, value in (("from", start), ("to", end)):
        if value.tzinfo is None:
            raise InvalidInput(f"{value.isoformat()} has no offset; write e.g. 2026-03-08T00:00:00Z", name)
    if start < EARLIEST_BACKFILL:
        raise InvalidInput(f"`from` is before {EARLIEST_BACKFILL:%Y-%m-%d}; a backfill replays a job's past", "from")
    if start >= end:
        raise InvalidInput("`from` must be before `to`", "from")
    if end > now:
        raise InvalidInput(
            "`to` is in the future; a backfill replays past slots only (the ticker runs the future ones)", "to"
        )
    slots: list[datetime] = []
    for slot in schedule.slots(start - timedelta(microseconds=1), tz):
        if slot > end:
            break
        if len(slots) == limit:
            raise InvalidInput(
                f"the range holds more than {limit} slots of this job; split it into smaller ranges", "to"
            )
        slots.append(slot)
    return slots


#: The `notice` of the results-stream message that alerts a job's channel of its pause.
PAUSED_NOTICE = "paused"


def pause_note(failures: int, run_id: str) -> str:
    """The note of a job paused by `pause_after_failures`: why, and what to do."""
    return (f"paused after {failures} consecutive failed runs (the last: run {run_id}); "
            "fix the job, then `kjob enable` it")


def pause_alert(slug: str, channel: str, failures: int, note: str, log_url: str) -> dict[str, Any]:
    """The Relay body (RFC section 7's shape) telling a job's channel that the job was paused."""
    return {
        "channel": channel,
        "message": {
            "title": f"[{slug}] paused after {failures} failures",
            "body": f"{note}\n\nLast run's log: {log_url}",
            "status": "failed",
        },
    }
