"""All configuration, in one pydantic settings object.

Sources, strongest first: `KJOB_*` environment variables (nested with `__`, e.g.
`KJOB_EXECUTOR__CONCURRENCY=8`), then the TOML file named by `KJOB_CONFIG` (default
`$KJOB_HOME/config.toml`), then the defaults below.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from kjob.model.channels import DEFAULT_CHANNEL_KINDS, KIND_PATTERN

ROLES = ("ticker", "executor", "dispatcher", "api")


def default_home() -> Path:
    return Path(os.environ.get("KJOB_HOME") or Path.home() / ".local" / "share" / "kjob")


def config_file() -> Path:
    """The TOML settings file: `KJOB_CONFIG`, else `$KJOB_HOME/config.toml` (may not exist)."""
    return Path(os.environ.get("KJOB_CONFIG") or default_home() / "config.toml")


class ExecutorSettings(BaseModel):
    # 16, not 8: an agent mostly waits on its model, and at 8 a 2-core node ran 88 of 100
    # sandbox starts a second where 16 ran all of them (bench/fastpath.py, 2026-12-02).
    concurrency: int = Field(default=16, ge=1, description="runs in flight per node")
    processes: int = Field(
        default=1, ge=1, le=64,
        description="executor processes per node, sharing `concurrency`: more than one uses more cores; "
        "each extra one claims as `<node name>.<n>`",
    )
    # Off by default: on 2 cores at 100 slots/s they cut a run's claim -> end from ~90 to ~55 ms
    # and p50 by 10-25 %, but p99 over 90 s went from 0.76 s to 1.2-1.5 s (bench/fastpath.py,
    # 2026-12-03); 128 where herds matter and cores are spare.
    warm_starts: int = Field(
        default=0, ge=0, le=10_000,
        description="process sandboxes built ahead for runs the look-ahead brought early, each holding its agent "
        "back until the run is claimed at its instant (0: none); a job changed, disabled or deleted meanwhile "
        "has its sandbox ended unstarted; try 128",
    )
    # Half a second, not one: slots fall on whole seconds, and builds one second ahead would
    # land on the instant of the slots before them (bench/fastpath.py, 2026-12-03).
    warm_ahead_s: float = Field(default=0.5, gt=0, le=60, description="how long before its instant a warm start is built")
    agents_file: Path | None = Field(default=None, description="TOML agent registry; built-ins when unset")
    output_cap_bytes: int = Field(default=1_048_576, ge=1024, description="stdout+stderr kept per attempt")
    heartbeat_s: float = Field(default=5.0, gt=0, description="claim and ack-wait renewal period")
    claim_lease_s: float = Field(default=20.0, gt=0, description="a claim not renewed for this long is lost")
    claim_margin_s: float = Field(
        default=5.0, ge=0,
        description="an attempt whose claim could not be renewed is stopped this long before the claim can expire",
    )
    outcome_keep_s: float = Field(
        default=600.0, gt=0,
        description="how long a finished attempt's outcome is kept and retried while the database is away",
    )
    workdir: Path | None = Field(default=None, description="where attempt work dirs go; $KJOB_HOME/work when unset")
    sandboxes: list[Literal["process", "docker"]] = Field(
        default=["process", "docker"], description="sandbox backends this node offers"
    )
    docker_url: str | None = Field(default=None, description="Docker endpoint; $DOCKER_HOST or the local socket when unset")
    require_isolation: bool = Field(
        default=False, description="refuse to start the process backend when bubblewrap cannot isolate agents"
    )
    output_log: Path | None = Field(
        default=None, description="also write agent stdout/stderr here as JSON lines with the run id (a log shipper's file)"
    )
    extra_binds: list[Path] = Field(
        default=[],
        description="host directories the operator shares read-write with every process sandbox, at the same path "
        "(e.g. a tools cache); nothing else of the host's writable state is visible to agents",
    )
    host_network_tenants: list[str] = Field(
        default=[],
        description="tenants whose jobs may set sandbox.network = \"host\" (the node's own network, its "
        "loopback services included); checked when a job is written and again when it runs",
    )
    sandbox_disk: str = Field(
        default="512m", pattern=r"^[0-9]+[kmgKMG]?$",
        description="size of each sandbox's work dir and of its /tmp (each a tmpfs: RAM, no host disk)",
    )
    sandbox_uid_base: int = Field(
        default=200_000, ge=1000, le=2**31 - 100_000,
        description="when the executor runs as root, process sandboxes run as uids from here up, one per attempt in flight",
    )
    # Agent runs (kjob.executor.agent_run, docs/agents.md)
    workspace_roots: list[Path] = Field(
        default=[], description="local directories a job's `workspace.git` may clone from (URLs are always allowed)"
    )
    workspace_timeout_s: float = Field(default=120.0, gt=0, description="a workspace clone taking longer fails the run")
    workspace_max_bytes: int = Field(default=512 * 1024**2, ge=1024, description="a workspace clone larger fails the run")


class DatabaseSettings(BaseModel):
    """Deadlines of the roles' database calls: a stalled or unreachable PostgreSQL must surface
    as an error within these, never as a call that hangs past an executor's claim."""

    statement_timeout_s: float = Field(default=10.0, gt=0, description="each statement, on the client (and the server)")
    connect_timeout_s: float = Field(default=5.0, gt=0, description="opening a connection")
    pool_timeout_s: float = Field(default=10.0, gt=0, description="waiting for a free pooled connection")


class DispatcherSettings(BaseModel):
    concurrency: int = Field(default=16, ge=1)
    timeout_s: float = Field(default=10.0, gt=0, description="per HTTP request to Relay")
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=10.0, gt=0)
    give_up_after_s: float = Field(default=86_400.0, gt=0, description="then the delivery is marked failed")
    allow_private_targets: list[str] = Field(
        default=[],
        description="networks (CIDR or address) and host names a job's webhook may reach although they are "
        "loopback, link-local or private (docs/security.md); checked when a job is saved and at every connect",
    )

    @field_validator("allow_private_targets")
    @classmethod
    def _targets_parse(cls, v: list[str]) -> list[str]:
        from kjob.model.targets import AllowList

        AllowList.parse(v)
        return v

    def allow_list(self):
        """`allow_private_targets`, parsed (a kjob.model.targets.AllowList)."""
        from kjob.model.targets import AllowList

        return AllowList.parse(self.allow_private_targets)


class TickerSettings(BaseModel):
    resync_s: float = Field(default=60.0, gt=0, description="full reload of enabled jobs, a safety net for lost events")
    recover_s: float = Field(default=10.0, gt=0, description="how often unpublished or stranded runs are re-published")
    late_grace_s: float = Field(default=15.0, ge=0, description="slots this late after a failover or restart count as inside any catch-up window, and run under policy none too")
    lease_ttl_s: float = Field(default=1.0, gt=0, description="leader lease: a standby takes over this long after the last renewal")
    lease_renew_s: float = Field(default=0.25, gt=0, description="how often the leader renews its lease")
    ledger_give_up_s: float = Field(default=30.0, gt=0, description="the leader steps down when it cannot write to the ledger this long, so a standby that can may lead")
    vanished_after_s: float = Field(default=60.0, gt=0, description="a published run still waiting this long is re-published if the stream no longer holds as many due messages as the ledger")
    lookahead_ms: float = Field(
        default=2000.0, ge=0, le=60_000,
        description="slots are written and published this long before they fire, and executors hold each until its "
                    "instant (by the database's clock), so a herd or a failover starts on time; a job disabled, "
                    "re-scheduled or deleted meanwhile does not run it. 0: written and published at the instant",
    )


class ApiSettings(BaseModel):
    """The HTTP gateway's limits."""

    apply_max_body_bytes: int = Field(
        default=32 * 1024**2, ge=256 * 1024,
        description="the largest body of one `kjob apply` (POST /v1/jobs:apply); other requests: 256 KiB",
    )


class TenantQuota(BaseModel):
    """Limits of one tenant; a field left unset takes the `[quotas]` default."""

    model_config = ConfigDict(extra="forbid")

    max_jobs: int | None = Field(default=None, ge=0)
    max_concurrent_runs: int | None = Field(default=None, ge=1)
    min_interval_s: float | None = Field(default=None, ge=0)
    run_now_per_minute: int | None = Field(default=None, ge=0)
    max_cost_usd_per_day: float | None = Field(default=None, gt=0)


class QuotaSettings(BaseModel):
    """Per-tenant limits (docs/security.md). Defaults are generous; `[quotas.tenants.<name>]`
    in config.toml overrides them for one tenant."""

    model_config = ConfigDict(extra="forbid")

    max_jobs: int = Field(default=10_000, ge=0, description="jobs a tenant may have")
    max_concurrent_runs: int | None = Field(
        default=None, ge=1,
        description="runs of one tenant executing at once, cluster-wide; unset: no limit "
                    "(enforcing it serialises the tenant's claims, see docs/security.md)",
    )
    min_interval_s: float = Field(default=1.0, ge=0, description="the shortest gap a schedule may have between slots")
    run_now_per_minute: int = Field(default=60, ge=0, description="run-now requests per tenant per minute")
    max_cost_usd_per_day: float | None = Field(
        default=None, gt=0,
        description="USD a tenant's agents may spend per UTC day (as they report it); past it runs are recorded "
                    "`skipped` and one alert per job and day goes to the job's channel; unset: no cap",
    )
    tenants: dict[str, TenantQuota] = Field(default_factory=dict)


class DbusSettings(BaseModel):
    """The D-Bus service `dev.koder.scheduler` (docs/dbus.md), off unless enabled."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="offer the D-Bus service on this node (`kjob up --dbus`)")
    bus: Literal["session", "system"] = Field(
        default="session", description="the desktop's session bus, or the system bus (the LXC pair)"
    )
    #: A bus address (`unix:path=...`) instead of the bus's usual one.
    address: str | None = None
    #: The gateway the service calls with each caller's token; the node's own API when unset.
    api_url: str | None = None
    #: NATS for the events behind the signals, as a user allowed `kjob.event.>` (the `observer`
    #: of deploy/nats/nats-server.conf); the node's NATS URL when unset.
    nats_url: str | None = None
    #: How long a subscriber's token is trusted before it is checked again (revocation ends signals).
    recheck_s: float = Field(default=60.0, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KJOB_", env_nested_delimiter="__", extra="ignore")

    home: Path = Field(default_factory=default_home)
    #: Where the CLI finds the gateway. `kjob up` writes the URL it listens on beside the token.
    api_url: str | None = None
    token: str | None = None
    #: External servers. Unset: `kjob up` starts embedded ones under `home`.
    nats_url: str | None = None
    database_url: str | None = None
    relay_url: str | None = None
    relay_token: str | None = None
    #: The channel kinds a job's `output.channel` may name (`<kind>:<address>`): those the Relay
    #: delivers to (kjob.model.channels). Another kind is refused when the job is written.
    relay_channel_kinds: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CHANNEL_KINDS), min_length=1,
        description="channel kinds Relay delivers to; a job naming another is refused at create",
    )
    #: The base of links to full logs in Relay messages; the API URL when unset.
    public_url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8742, ge=0, le=65535)
    node_name: str | None = None
    stream_replicas: int = Field(default=1, ge=1, le=5)
    #: How long JetStream waits for an ack before redelivering; executors heartbeat well inside it.
    ack_wait_s: float = Field(default=30.0, gt=0)
    #: OpenID Connect bearer tokens (docs/security.md). Unset issuer: only kjob's own API tokens.
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    #: Where the issuer's keys are; discovered from `<issuer>/.well-known/openid-configuration` when unset.
    oidc_jwks_url: str | None = None
    oidc_tenant_claim: str = "tenant"
    oidc_roles_claim: str = "roles"
    #: How long fetched keys are trusted, and the least time between two fetches an unknown `kid` may cause.
    oidc_jwks_cache_s: float = Field(default=600.0, gt=0)
    oidc_jwks_refetch_s: float = Field(default=10.0, ge=0)
    #: Admins of this tenant may manage the tokens of every tenant; empty: no such tenant.
    admin_tenant: str = "default"
    #: Fernet key(s) for secrets at rest, comma-separated (the first encrypts, all decrypt);
    #: `$KJOB_HOME/secret.key` when unset (`kjob up` creates it).
    secret_key: str | None = None
    quotas: QuotaSettings = Field(default_factory=QuotaSettings)
    #: `json`: one JSON object per log line, with the run's tenant, job, run id and trace id.
    log_format: Literal["console", "json"] = "console"
    log_level: str = "INFO"
    #: How often a node samples its JetStream consumers' backlog for /metrics.
    metrics_poll_s: float = Field(default=10.0, gt=0)
    #: Label the agent usage metrics with tenant and job too. /metrics is served without a
    #: token, so only where no tenant can reach it (and the number of jobs is bounded);
    #: otherwise they are by agent, and per tenant and job in the API (docs/agents.md).
    metrics_usage_by_job: bool = False
    #: How often nodes with the ticker role prune run history past each job's `history` policy.
    history_prune_s: float = Field(default=300.0, gt=0)
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    dispatcher: DispatcherSettings = Field(default_factory=DispatcherSettings)
    ticker: TickerSettings = Field(default_factory=TickerSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    dbus: DbusSettings = Field(default_factory=DbusSettings)
    #: The web dashboard at /ui (docs/dashboard.md). `frame-ancestors` sources that may embed it
    #: in a frame (kanvas: `'self' https://kanvas.example.org`; `'none'` forbids every frame).
    ui_frame_ancestors: str = Field(default="'self'", pattern=r"^[^;,\r\n]+$")
    #: The session cookie's SameSite; `none` (sent in cross-site frames) also marks it Secure,
    #: so the dashboard must then be served over HTTPS.
    ui_cookie_samesite: Literal["lax", "strict", "none"] = "lax"
    #: How long a browser session lasts (revoking the token, or a JWT's expiry, ends it sooner).
    ui_session_s: int = Field(default=12 * 3600, ge=60)

    @field_validator("relay_channel_kinds")
    @classmethod
    def _kinds(cls, v: list[str]) -> list[str]:
        for kind in v:
            if not re.fullmatch(KIND_PATTERN, kind):
                raise ValueError(f"{kind!r} is not a channel kind: lowercase letters, digits and '-'")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=config_file()))

    @property
    def token_file(self) -> Path:
        return self.home / "admin.token"

    @property
    def api_url_file(self) -> Path:
        return self.home / "api.url"

    @property
    def credentials_file(self) -> Path:
        """Passwords of `kjob up`'s embedded PostgreSQL and NATS users (mode 0600)."""
        return self.home / "credentials.toml"

    @property
    def secret_key_file(self) -> Path:
        return self.home / "secret.key"

    @property
    def work_dir(self) -> Path:
        return self.executor.workdir or self.home / "work"


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
