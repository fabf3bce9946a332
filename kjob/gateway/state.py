"""What the gateway needs from the rest of the node, built once by whoever runs the API."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from sqlalchemy.ext.asyncio import AsyncEngine

from kjob.config import Settings
from kjob.executor.agents import AgentRegistry
from kjob.model.job import Job
from kjob.store.jobs import Applied, JobStore
from kjob.store.tokens import TokenStore

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from kjob.gateway.oidc import OidcVerifier
    from kjob.model.run import Run
    from kjob.store.quotas import Quotas
    from kjob.store.runs import RunReads
    from kjob.store.secrets import SecretStore
    from kjob.store.slots import SlotLedger

#: What happened to a job. `unchanged` applies are not announced.
ChangeKind = Literal["created", "updated", "enabled", "disabled", "deleted"]

#: Called after every committed write: (job after the write or None once deleted, tenant, slug, kind).
JobChangedHook = Callable[[Job | None, str, str, ChangeKind], Awaitable[None]]


#: Called after a committed apply of many jobs: (tenant, [(job after the write, kind)]). Each
#: job is the store's `Applied` (`.id`, `.slug`; `.job()` builds the `Job`, which an apply of
#: 10,000 need not do just to announce their ids).
JobsChangedHook = Callable[[str, "list[tuple[Applied, ChangeKind]]"], Awaitable[None]]


async def _ignore_change(job: Job | None, tenant: str, slug: str, kind: ChangeKind) -> None:
    """The default hook: a gateway without a bus announces nothing."""


@dataclass(kw_only=True)
class GatewayState:
    """The gateway's collaborators. The node wires `on_job_changed` to NATS events so the
    ticker wakes at once; a failing hook is logged and never fails the committed request
    (the ticker's periodic resync catches up)."""

    settings: Settings
    engine: AsyncEngine
    jobs: JobStore
    tokens: TokenStore
    agents: AgentRegistry
    #: Whether a Relay URL is configured: without it, only `none` and `webhook:` channels deliver.
    relay_configured: bool
    on_job_changed: JobChangedHook = field(default=_ignore_change)
    #: Announces an apply's changes together; None: one `on_job_changed` per job.
    on_jobs_changed_hook: JobsChangedHook | None = None
    #: The run ledger's read side, for run history and logs. None: this gateway serves no runs.
    runs: "RunReads | None" = None
    #: The ledger's slots, for runs outside the schedule (run-now, backfill). None: as `runs`.
    slots: "SlotLedger | None" = None
    #: Puts a run the ledger holds onto the bus (run-now). None: runs cannot be started here.
    publish_due: "Callable[[Run], Awaitable[None]] | None" = None
    #: JetStream, for following live logs. None: logs are served from the ledger only.
    js: "JetStreamContext | None" = None
    #: Security collaborators; `create_app` builds the ones left None from `settings`
    #: (kjob.gateway.auth.wire_security): OIDC verifier (None without an issuer), secrets, quotas.
    oidc: "OidcVerifier | None" = None
    secrets: "SecretStore | None" = None
    quotas: "Quotas | None" = None

    async def on_jobs_changed(self, tenant: str, changed: "list[tuple[Applied, ChangeKind]]") -> None:
        if self.on_jobs_changed_hook is not None:
            await self.on_jobs_changed_hook(tenant, changed)
            return
        for applied, kind in changed:
            await self.on_job_changed(applied.job(), tenant, applied.slug, kind)
