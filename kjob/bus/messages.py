"""The messages kjob puts on NATS, as JSON. This module is their schema (see docs/bus.md).

Every message also carries the run id and tenant as headers (`Kjob-Run-Id`, `Kjob-Tenant`)
and, where a trace is active, the W3C `traceparent`.
"""

from __future__ import annotations

import enum
from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from kjob.model.run import Run, RunStatus, Trigger


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, data: bytes):
        return cls.model_validate_json(data)


class DueRun(_Message):
    """`kjob.run.due.<tenant>`: a run the ledger says should start now. Msg-Id = run id."""

    run_id: str
    job_id: UUID
    tenant: str
    slug: str
    slot: datetime
    trigger: Trigger
    #: Fencing token of the ticker leader that published it (0 when not elected).
    leader_rev: int = 0


class RunResult(_Message):
    """`kjob.run.result.<tenant>`: a run reached a final status; the dispatcher delivers it."""

    run_id: str
    job_id: UUID
    tenant: str
    slug: str
    status: RunStatus
    attempt: int
    exit_code: int | None = None
    finished_at: datetime
    #: Set on a notice about the run's job rather than the run's own result: `paused` (the
    #: job was paused by `pause_after_failures` after this run). Msg-Id `<run id>.<notice>`.
    notice: str | None = None
    #: With notice `paused`: how many failed runs in a row paused the job.
    failures: int | None = None

    @classmethod
    def of(cls, run: Run, *, finished_at: datetime, notice: str | None = None,
           failures: int | None = None) -> "RunResult":
        """The message of `run`; `finished_at` stands in for an end the ledger has not stamped."""
        return cls(run_id=run.id, job_id=run.job_id, tenant=run.tenant, slug=run.slug, status=run.status,
                   attempt=run.attempt, exit_code=run.exit_code, finished_at=run.finished_at or finished_at,
                   notice=notice, failures=failures)


class EventKind(enum.StrEnum):
    job_changed = "job_changed"
    run_started = "run_started"
    run_finished = "run_finished"
    run_dispatched = "run_dispatched"


class Event(_Message):
    """`kjob.event.<tenant>.<kind>`: what happened, for other services and for the ticker."""

    kind: EventKind
    tenant: str
    job_id: UUID | None = None
    slug: str | None = None
    #: job_changed of many jobs at once (an apply): their ids; `job_id` and `slug` are unset.
    job_ids: list[UUID] | None = None
    run_id: str | None = None
    #: job_changed: created | updated | enabled | disabled | deleted; runs: their status
    detail: str | None = None
    at: datetime

    @classmethod
    def about_run(cls, kind: EventKind, run: Run, detail: str, at: datetime) -> "Event":
        return cls(kind=kind, tenant=run.tenant, job_id=run.job_id, slug=run.slug, run_id=run.id,
                   detail=detail, at=at)
