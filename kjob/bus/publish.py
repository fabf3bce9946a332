"""Publishing kjob's messages from outside the ticker: one function per message, so the node
(run-now, backfill, job changes) and the executor (a job paused after failures) put the same
bytes and headers on the bus."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from kjob._time import utcnow
from kjob.bus import names
from kjob.bus.errors import BUS_ERRORS
from kjob.bus.messages import DueRun, Event, EventKind, RunResult
from kjob.model.run import Run, Trigger
from kjob.telemetry import metrics, tracing

log = logging.getLogger(__name__)


async def publish_due(js: JetStreamContext, run: Run) -> None:
    """Put a run the ledger holds on `kjob.run.due.<tenant>`, `Nats-Msg-Id` = run id (and
    `<run id>.backfill` for a backfill: it may run a slot whose own due message was just
    published and skipped, and the stream would drop the same id as a duplicate)."""
    msg = DueRun(run_id=run.id, job_id=run.job_id, tenant=run.tenant, slug=run.slug,
                 slot=run.slot, trigger=run.trigger)
    subject = names.run_due(run.tenant)
    with tracing.publishing(subject, run_id=run.id, tenant=run.tenant, job=run.slug, slot=run.slot,
                            trigger=run.trigger.value) as trace_headers:
        await js.publish(subject, msg.encode(), headers={
            names.HDR_MSG_ID: names.due_msg_id(run.id, backfill=run.trigger is Trigger.backfill),
            **names.run_headers(run.id, run.tenant), **trace_headers})
    metrics.run_published(run.slot, run.trigger.value)


async def publish_result(js: JetStreamContext, run: Run) -> None:
    """Put a final run on `kjob.run.result.<tenant>` for the dispatchers, `Nats-Msg-Id` =
    `<run id>.result`: from the executor that ran it, or the ticker's recovery when that
    message was lost (a repeat is harmless: the dispatcher claims the delivery)."""
    result = RunResult.of(run, finished_at=utcnow())
    headers = {names.HDR_MSG_ID: names.result_msg_id(run.id), **names.run_headers(run.id, run.tenant),
               **tracing.headers()}
    await js.publish(names.run_result(run.tenant), result.encode(), headers=headers)


async def announce_job_changed(js: JetStreamContext, tenant: str, job_id: UUID | None, slug: str, kind: str) -> None:
    """`kjob.event.<tenant>.job_changed`: the ticker reloads the job at once. `kind`: created,
    updated, enabled, disabled or deleted."""
    event = Event(kind=EventKind.job_changed, tenant=tenant, job_id=job_id, slug=slug, detail=kind,
                  at=utcnow())
    await js.publish(names.event(tenant, EventKind.job_changed), event.encode())


async def publish_event(nc, event: Event) -> None:
    """`kjob.event.<tenant>.<kind>` about a run, core NATS (the events stream keeps it). Events
    are for observers: one that cannot be sent is logged and never holds up the run."""
    try:
        await nc.publish(names.event(event.tenant, event.kind), event.encode(),
                         headers=names.run_headers(event.run_id or "", event.tenant))
    except BUS_ERRORS as err:
        log.warning("could not publish the %s event of run %s (%r)", event.kind, event.run_id, err)


#: Job ids per batch event: some 80 KB, well inside NATS's 1 MB message limit.
JOBS_PER_EVENT = 2000


async def announce_jobs_changed(js: JetStreamContext, tenant: str, job_ids: list[UUID], kind: str) -> None:
    """`kjob.event.<tenant>.job_changed` naming many jobs (`job_ids`), a few events for a file
    of 10,000 jobs instead of one each. A reader that knows no `job_ids` sees an event without
    a job, and reloads every job."""
    now = utcnow()
    for i in range(0, len(job_ids), JOBS_PER_EVENT):
        event = Event(kind=EventKind.job_changed, tenant=tenant, job_ids=job_ids[i : i + JOBS_PER_EVENT],
                      detail=kind, at=now)
        await js.publish(names.event(tenant, EventKind.job_changed), event.encode())


@dataclass(frozen=True, slots=True)
class Outgoing:
    subject: str
    data: bytes
    headers: dict[str, str]


class Acked(enum.IntEnum):
    """What the stream said of one message; false only for `NOT_STORED`."""

    NOT_STORED = 0
    STORED = 1
    #: Its Msg-Id was seen within the duplicate window: the stream kept the earlier message
    #: (which may have been consumed since).
    DUPLICATE = 2


async def publish_acked(nc: NATS, messages: Sequence[Outgoing], timeout_s: float = 5.0) -> list[Acked]:
    """Publish many messages to JetStream and wait for every stream ack; per message, whether
    the stream stored it (`Acked`, true if so: a duplicate Msg-Id counts, it is stored already).

    Pipelined: one reply subject per message under a single inbox subscription, instead of one
    request (future, timer) per message as `js.publish` does: about five times the throughput,
    which is what lets a ticker publish a herd of 10,000 due runs within its second.
    """
    if not messages:
        return []
    stored = [Acked.NOT_STORED] * len(messages)
    remaining = len(messages)
    all_acked = asyncio.Event()
    inbox = nc.new_inbox()

    async def on_ack(msg) -> None:
        nonlocal remaining
        index = int(msg.subject.rsplit(".", 1)[1])
        try:
            ack = json.loads(msg.data)
            if "error" not in ack:
                stored[index] = Acked.DUPLICATE if ack.get("duplicate") else Acked.STORED
        except ValueError:
            pass
        remaining -= 1
        if remaining == 0:
            all_acked.set()

    sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
    try:
        for i, m in enumerate(messages):
            await nc.publish(m.subject, m.data, reply=f"{inbox}.{i}", headers=m.headers)
        await nc.flush(timeout=timeout_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await all_acked.wait()
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return stored
