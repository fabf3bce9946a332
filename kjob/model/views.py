"""What the API answers, as pydantic models: the gateway validates its answers with these, and
`kjob.client` parses them with the same classes, so both ends of the wire agree by construction.

Pure data: no I/O. The requests are `kjob.model.job.JobSpec` and the small bodies beside each
route (`BackfillRequest`, `TokenRequest`, ...).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kjob.model.job import Job
from kjob.model.policies import OverlapPolicy
from kjob.model.run import Attempt, MissReason, Run

ApplyAction = Literal["created", "updated", "unchanged"]
Role = Literal["viewer", "operator", "editor", "admin"]


class JobView(Job):
    """A stored job as the API shows it: the JobSpec fields, what the store assigned, and
    `next_fire`, the next slot as `YYYY-MM-DDTHH:MM:SSZ` (null when disabled or when the
    schedule has no slot left)."""

    next_fire: str | None = None
    #: What the job's agents reported over the last 7 days (GET /jobs/{slug} only; docs/agents.md).
    usage_7d: dict[str, Any] | None = None


class ApplyResult(BaseModel):
    action: ApplyAction
    job: JobView


class AppliedAction(BaseModel):
    """One job of an apply answered with `results=actions`: its slug and what was done."""

    slug: str
    action: ApplyAction


class RunView(Run):
    """A ledger row, plus how long it ran (seconds, null until finished) and what its agent
    reported over all its attempts (`agent`, `model`, `tokens_in`, `tokens_out`, `cost_usd`,
    `turns`; null when no agent report was recorded; docs/agents.md)."""

    duration_s: float | None = None
    usage: dict[str, Any] | None = None


class RunDetail(RunView):
    attempts: list[Attempt] = []


class MissedRangeView(BaseModel):
    """Slots a long downtime left unrun, beyond those listed one by one in the job's runs:
    `count` slots from `first_slot` to `last_slot` (at least `count` when `count_exact` is
    false), none of which ran, for `reason`: a sentence for people, and `reason_code`, a
    MissReason value for programs (GET /v1/jobs/{slug}/missed)."""

    first_slot: datetime
    last_slot: datetime
    count: int
    count_exact: bool
    status: Literal["missed"] = "missed"
    reason: str
    #: None only for a record written before the ledger kept codes (migration 0011).
    reason_code: MissReason | None = None


def run_view(run: Run, usage: dict[str, Any] | None = None) -> RunView:
    return RunView.model_validate({**dict(run), "duration_s": run.duration(), "usage": usage})


class BackfillResult(BaseModel):
    #: Slots of the job in the range.
    slots: int
    #: New runs, published to the executors.
    queued: int
    #: Slots the ledger already held: not run again.
    existing: int
    #: The overlap policy the new runs start under.
    overlap: OverlapPolicy
    run_ids: list[str]


class TokenView(BaseModel):
    """A token as lists show it: never its secret."""

    id: str
    tenant: str
    role: Role
    name: str
    created_at: datetime
    revoked_at: datetime | None = None


class NewToken(TokenView):
    #: The bearer secret: shown this once, stored only as a hash.
    secret: str


class SecretView(BaseModel):
    """A secret as the API shows it: its name and when it was set, never its value."""

    name: str
    created_at: datetime
    updated_at: datetime


class AuditView(BaseModel):
    id: int
    at: datetime
    tenant: str
    #: Who: `token:<id>` for a kjob API token, `oidc:<sub>` for an OpenID Connect token.
    actor: str
    token_id: str | None = None
    #: `<kind>.<verb>`: job.create, job.update, job.delete, job.enable, job.disable, job.run,
    #: job.backfill, token.create, token.revoke, secret.set, secret.delete.
    action: str
    #: `job/<slug>`, `token/<id>` or `secret/<name>`.
    target: str
    #: What changed (for updates `{field: {"from": ..., "to": ...}}`); never a secret.
    change: dict[str, Any] | None = None


class QuotaLimits(BaseModel):
    max_jobs: int
    #: None: no limit.
    max_concurrent_runs: int | None
    min_interval_s: float
    run_now_per_minute: int
    #: None: no cap (docs/agents.md).
    max_cost_usd_per_day: float | None = None


class QuotaUsage(BaseModel):
    jobs: int
    concurrent_runs: int
    run_now_last_minute: int
    #: What the tenant's agents reported spending since 00:00 UTC.
    cost_usd_today: float = 0.0


class QuotaView(BaseModel):
    tenant: str
    limits: QuotaLimits
    usage: QuotaUsage


class LeaderView(BaseModel):
    model_config = ConfigDict(extra="allow")

    node: str
    #: The election revision: the fencing token of the ledger's slot writes.
    revision: int
    since: str | None = None
    lease_age_s: float


class StatusView(BaseModel):
    """`GET /v1/status`: the cluster as one node sees it. Nodes and streams are kept as the
    bus reports them (their keys grow with the cluster's features)."""

    model_config = ConfigDict(extra="allow")

    nodes: list[dict[str, Any]] = Field(default_factory=list)
    leader: LeaderView | None = None
    streams: dict[str, dict[str, Any]] = Field(default_factory=dict)
