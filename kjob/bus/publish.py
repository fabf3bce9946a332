"""Publishing kjob's messages from outside the ticker: one function per message, so the node
(run-now, backfill, job changes) and the executor (a job paused after failures) put the same
bytes and headers on the bus."""

from __future__ import annotations

from datetime import datetime, timezone
from uuid import UUID

from nats.js import JetStreamContext

from kjob.bus import names
from kjob.bus.messages import DueRun, Event
from kjob.model.run import Run
from kjob.telemetry import metrics, tracing


async def publish_due(js: JetStreamContext, run: Run) -> None:
    """Put a run the ledger holds on `kjob.run.due.<tenant>`, `Nats-Msg-Id` = run id."""
    msg = DueRun(run_id=run.id, job_id=run.job_id, tenant=run.tenant, slug=run.slug,
                 slot=run.slot, trigger=run.trigger.value)
    subject = names.run_due(run.tenant)
    with tracing.publishing(subject, run_id=run.id, tenant=run.tenant, job=run.slug, slot=run.slot,
                            trigger=run.trigger.value) as trace_headers:
        await js.publish(subject, msg.encode(), headers={
            "Nats-Msg-Id": run.id, names.HDR_RUN_ID: run.id, names.HDR_TENANT: run.tenant, **trace_headers})
    metrics.run_published(run.slot, run.trigger.value)


async def announce_job_changed(js: JetStreamContext, tenant: str, job_id: UUID | None, slug: str, kind: str) -> None:
    """`kjob.event.<tenant>.job_changed`: the ticker reloads the job at once. `kind`: created,
    updated, enabled, disabled or deleted."""
    event = Event(kind="job_changed", tenant=tenant, job_id=job_id, slug=slug, detail=kind,
                  at=datetime.now(timezone.utc))
    await js.publish(names.event(tenant, "job_changed"), event.encode())
