"""The job: what a user writes (JobSpec) and what the store keeps (Job).

Pure: no I/O. Every check of invariant 4 that needs no server lives here, so the gateway,
the CLI and job files all refuse the same input with the same message.
"""

from __future__ import annotations

import posixpath
import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, Mapping, NamedTuple
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kjob.errors import InvalidInput
from kjob.model.durations import format_duration, parse_duration
from kjob.model.policies import MAX_JITTER, OverlapPolicy
from kjob.model.schedule import Schedule, zone
from kjob.model.sizes import parse_size
from kjob.model.text import find_bad_text

SLUG_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
MAX_PROMPT_BYTES = 64 * 1024
MAX_TIMEOUT = timedelta(hours=24)
#: Bounds of invariant 4: each keeps every later computation (now - window, slot + delay,
#: the sandbox's limits) in range, so no accepted job can fail every run or crash a role.
MAX_CATCHUP_WINDOW = timedelta(days=366)
MAX_RETRY_DELAY = timedelta(hours=24)
MAX_RETRY_MAX_DELAY = timedelta(days=7)
#: Docker refuses less than 6 MiB; the largest machines have a few TiB.
MIN_MEMORY = 6 * 1024**2
MAX_MEMORY = 16 * 1024**4
MAX_CPUS = 1024.0
MAX_PIDS = 1_000_000
#: Container paths a work dir (a tmpfs) may not cover: the system the agent needs to run.
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin",
               "/sys", "/usr", "/var", "/tmp")
MAX_WORKDIR_CHARS = 255
_NO_JITTER = timedelta(0)
#: A POSIX environment variable name; `A=B`, NUL or an empty name could never be set.
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: What a job may ask of the network; `host` only for tenants the operator allows
#: (`executor.host_network_tenants`), see docs/sandboxes.md.
NetworkMode = Literal["none", "egress", "host"]


def _to_timedelta(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except InvalidInput as e:
            raise ValueError(e.message) from None
    return value


Duration = Annotated[
    timedelta,
    BeforeValidator(_to_timedelta),
    PlainSerializer(format_duration, return_type=str, when_used="json-unless-none"),
]


def at_most(limit: timedelta, what: str) -> AfterValidator:
    """A Duration's upper bound (Annotated[Duration, at_most(...)]), said in its message."""

    def check(value: timedelta) -> timedelta:
        if value > limit:
            raise ValueError(f"{what} can be at most {format_duration(limit)}")
        return value

    return AfterValidator(check)


def check_env(env: Mapping[str, str]) -> None:
    """Raise ValueError unless every key is a variable name and no value holds a NUL byte
    (neither can reach a process: the run would fail every time)."""
    for key, value in env.items():
        if not ENV_NAME_PATTERN.match(key):
            raise ValueError(f"{key!r} is not an environment variable name (letters, digits, '_', not starting with a digit)")
        if "\x00" in value:
            raise ValueError(f"the value of {key} holds a NUL byte, which no environment variable can carry")


def check_timezone(name: str) -> str:
    """Return `name` if it is an IANA zone this machine knows, else raise InvalidInput."""
    zone(name)
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SandboxSpec(_Strict):
    """Where the agent runs. `process` runs it on the executor's host; `docker` in a container."""

    backend: Literal["process", "docker"] = "process"
    image: str | None = Field(default=None, validate_default=True)
    network: NetworkMode = "none"
    memory: str | None = None
    cpus: float | None = Field(default=None, gt=0, le=MAX_CPUS, allow_inf_nan=False)
    pids: int | None = Field(default=None, gt=0, le=MAX_PIDS)
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = None
    pull: Literal["never", "if-missing"] = "never"

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                size = parse_size(v)
            except InvalidInput as e:
                raise ValueError(e.message) from None
            if not MIN_MEMORY <= size <= MAX_MEMORY:
                raise ValueError(f"{v!r} is out of range: memory is 6m to 16t, e.g. '512m' or '2g'")
        return v

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if (not v.startswith("/") or len(v) > MAX_WORKDIR_CHARS or posixpath.normpath(v) != v
                or v.startswith("//") or not re.fullmatch(r"[A-Za-z0-9._/-]+", v)):
            raise ValueError(f"{v!r} is not a plain absolute path in the container, e.g. '/work' "
                             "(no '..', '.', '//' or trailing '/')")
        if v == "/" or any(v == d or v.startswith(d + "/") for d in SYSTEM_DIRS):
            raise ValueError(f"{v!r} would hide the container's system files; use a directory of its own, e.g. '/work'")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        check_env(v)
        return v

    @field_validator("image")
    @classmethod
    def _docker_needs_image(cls, v: str | None, info: ValidationInfo) -> str | None:
        # a field validator (run on the default too) so the error names `sandbox.image`
        if info.data.get("backend") == "docker" and not v:
            raise ValueError("the docker backend needs an image, e.g. image = \"koder-cli:latest\"")
        return v


NotifyPolicy = Literal["always", "on_failure", "on_change", "never"]
DEFAULT_QUIET = "NO_REPLY"


class OutputSpec(_Strict):
    """Where the result goes: a Relay channel, `webhook:<https url>`, or `none` (stored only).

    `notify` says which finished runs are sent (kjob.model.notify); an answer that is exactly
    `quiet` is never sent. Runs that are not sent stay in the ledger with the reason."""

    channel: str = "none"
    notify: NotifyPolicy = "always"
    quiet: str = Field(default=DEFAULT_QUIET, max_length=200)

    @field_validator("channel")
    @classmethod
    def _channel_shape(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("channel cannot be empty; use 'none' to only store results")
        if v.startswith("webhook:") and not re.match(r"^webhook:https?://[^\s/]+", v):
            raise ValueError("a webhook channel is 'webhook:https://host/path'")
        return v


class RetryPolicy(_Strict):
    """How often a failed run is tried again, and how long to wait in between."""

    max: int = Field(default=0, ge=0, le=20)
    backoff: Literal["exponential", "fixed"] = "exponential"
    initial_delay: Annotated[Duration, at_most(MAX_RETRY_DELAY, "the first retry delay")] = timedelta(seconds=10)
    max_delay: Annotated[Duration, at_most(MAX_RETRY_MAX_DELAY, "the longest retry delay")] = timedelta(minutes=10)

    def delay(self, attempt: int) -> timedelta:
        """The wait before attempt `attempt + 1`, after attempt `attempt` (1-based) failed."""
        if self.backoff == "fixed":
            return min(self.initial_delay, self.max_delay)
        return min(self.initial_delay * (2 ** max(attempt - 1, 0)), self.max_delay)


class CatchupPolicy(_Strict):
    """What runs for slots that passed while no ticker was running (after downtime).

    `latest` runs the most recent missed slot if it is inside `window`; `all` runs every missed
    slot inside the window; `none` runs none. Every slot that does not run is written to the
    ledger as `missed` with its reason.
    """

    window: Annotated[Duration, at_most(MAX_CATCHUP_WINDOW, "the catch-up window")] = timedelta(hours=1)
    policy: Literal["latest", "all", "none"] = "latest"


class HistoryPolicy(_Strict):
    """How much run history to keep; unset keeps everything. Pruned in the background.

    A finished run is pruned when it is not among the job's newest `keep_runs` runs (by slot),
    or when it finished more than `keep_days` days ago. Never pruned: open runs, runs whose
    result still waits for delivery, and the job's latest scheduled slot (where the ticker
    resumes after a restart). A pruned slot is out of the ledger: a backfill may run it again.
    """

    keep_runs: int | None = Field(default=None, ge=1, le=1_000_000)
    keep_days: int | None = Field(default=None, ge=1, le=36_500)


class LimitsSpec(_Strict):
    """Budgets of one run: passed to the agent where it has a flag, else enforced by kjob from
    the agent's streamed output (the agent is stopped; the run ends `budget_exceeded`)."""

    max_cost_usd: float | None = Field(default=None, gt=0, le=10_000)
    max_turns: int | None = Field(default=None, ge=1, le=10_000)


class WorkspaceSpec(_Strict):
    """A fresh shallow clone of `git` at `ref` in the run's work dir, before the agent starts."""

    git: str
    ref: str = "main"

    @field_validator("git")
    @classmethod
    def _git(cls, v: str) -> str:
        v = v.strip()
        if not re.match(r"^(https?|ssh|git|file)://[^\s]+$|^/[^\s]*$|^[\w.-]+@[\w.-]+:[^\s]+$", v):
            raise ValueError("a workspace is a git URL (https://, ssh://, git@host:path, file://) or an absolute path")
        return v

    @field_validator("ref")
    @classmethod
    def _ref(cls, v: str) -> str:
        # git check-ref-format's rules that matter here; a leading '-' would be read as an option.
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,199}", v) or ".." in v or v.endswith((".", "/", ".lock")):
            raise ValueError(f"{v!r} is not a branch or tag name")
        return v


#: Validation context key: the text of the input was checked as a whole (kjob.model.text).
TEXT_CHECKED = "text_checked"


class JobSpec(_Strict):
    """A job as its author writes it (RFC section 5)."""

    slug: str
    prompt: str
    agent: str
    schedule: str
    timezone: str = "UTC"
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    retries: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout: Duration = timedelta(minutes=30)
    catchup: CatchupPolicy = Field(default_factory=CatchupPolicy)
    #: What a run does while the previous one still runs (see kjob.model.policies).
    overlap: OverlapPolicy = "skip"
    #: Up to this delay per slot, the same for a given (job, slot); capped at half the gap to
    #: the next slot. The run keeps its nominal slot.
    jitter: Duration = timedelta(0)
    #: Pause the job after this many failed runs in a row (opt-in), alerting its channel once.
    pause_after_failures: int | None = Field(default=None, ge=1, le=1000)
    history: HistoryPolicy = Field(default_factory=HistoryPolicy)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    workspace: WorkspaceSpec | None = None
    enabled: bool = True
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("slug")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.fullmatch(SLUG_PATTERN, v):
            raise ValueError(
                f"{v!r} is not a valid slug: use 1-63 lowercase letters, digits and '-', "
                "starting with a letter or digit"
            )
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the prompt cannot be empty")
        if len(v.encode()) > MAX_PROMPT_BYTES:
            raise ValueError(f"the prompt is {len(v.encode())} bytes; the limit is 64 KiB")
        return v

    @field_validator("agent")
    @classmethod
    def _agent(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", v):
            raise ValueError(f"{v!r} is not an agent name")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            return check_timezone(v)
        except InvalidInput as e:
            raise ValueError(e.message) from None

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        try:
            return Schedule.parse(v).expr
        except InvalidInput as e:
            raise ValueError(e.message) from None

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: timedelta) -> timedelta:
        if v <= timedelta(0):
            raise ValueError("the timeout must be positive, e.g. '30m'")
        if v > MAX_TIMEOUT:
            raise ValueError("the timeout can be at most 24h")
        return v

    @field_validator("jitter")
    @classmethod
    def _jitter(cls, v: timedelta) -> timedelta:
        if v > MAX_JITTER:
            raise ValueError("the jitter can be at most 24h, e.g. '30s' or '5m'")
        return v or _NO_JITTER  # one shared object for the common case: the ticker holds 100,000 jobs

    @model_validator(mode="after")
    def _storable(self, info: ValidationInfo) -> "JobSpec":
        # What the author wrote; a stored Job was checked when it was written (and the ticker
        # loads 100,000 of them). TEXT_CHECKED in the context: the caller checked the text of
        # the whole body already (an apply of 10,000 jobs, kjob.gateway.limits).
        if type(self) is not JobSpec:
            return self
        found = None if (info.context or {}).get(TEXT_CHECKED) else find_bad_text(self.model_dump())
        if found:
            field, problem = found
            raise PydanticCustomError("unstorable_text", "{problem}", {"problem": problem, "field": field or ""})
        if self.sandbox.backend == "process" and self.sandbox.workdir is not None:
            # Here, not on SandboxSpec: jobs stored before this check (where it was ignored) still load.
            raise PydanticCustomError(
                "workdir_process", "the process backend runs each attempt in a work dir of its own; "
                "sandbox.workdir is the docker backend's (a path in the container)", {"field": "sandbox.workdir"})
        return self


class Timing(NamedTuple):
    """When a stored job fires: what the checks of a write compare the new spec with (a
    schedule that can no longer fire, or fires too often, is refused only when it changes)."""

    schedule: str
    timezone: str


class Job(JobSpec):
    """A stored job: the spec plus what the store assigns."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: UUID
    tenant: str
    created_at: datetime
    updated_at: datetime
    #: When the job was last enabled (or created enabled): no slot before this instant runs,
    #: so enabling a job after a pause never fires a burst of old slots (invariant 1).
    enabled_at: datetime | None = None
    paused_note: str | None = None
    #: When the job was last paused (by `disable`, or by `pause_after_failures`); None while enabled.
    paused_at: datetime | None = None

    def spec(self) -> JobSpec:
        return JobSpec.model_validate(self.model_dump(include=set(JobSpec.model_fields)))


def validation_error(err: ValidationError) -> InvalidInput:
    """Turn pydantic's error into one InvalidInput naming the first bad field."""
    return error_from_detail(err.errors()[0])


def error_from_detail(first: Mapping[str, Any]) -> InvalidInput:
    """One pydantic error entry (`ValidationError.errors()[i]`, or FastAPI's request-validation
    entries with their `body`/`query` prefix removed) as an InvalidInput naming the field."""
    loc = [str(p) for p in first["loc"]]
    named = (first.get("ctx") or {}).get("field")  # an error of a whole model that names its field
    if named:
        loc.append(str(named))
    if "[key]" in loc:  # a bad dict key: name the table, not the key (the key is the bad text)
        loc = loc[: max(loc.index("[key]") - 1, 0)]
    field = ".".join(loc) or None
    msg = first["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if first["type"] == "missing":
        msg = "is required"
    elif first["type"] == "extra_forbidden":
        msg = "is not a job field"
    return InvalidInput(msg, field)


def in_job(err: InvalidInput, slug: Any, where: str) -> str:
    """The message of `err`, about one job of a file or batch, naming the job: `job 'audit':
    prompt is required`; by `where` (`job[2]`) when it has no slug to name it by."""
    who = f"job {slug!r}" if isinstance(slug, str) and slug else where
    # pydantic's short messages ("is required") read as a sentence with the field in front
    what = f"{err.field} {err.message}" if err.field and err.message.startswith("is ") else err.message
    return f"{who}: {what}"


def parse_job(data: dict[str, Any]) -> JobSpec:
    """Validate a job written as a dict (API body, TOML table). Raises InvalidInput."""
    if not isinstance(data, dict):
        raise InvalidInput("a job must be an object/table of fields")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


def merge_job(spec: JobSpec, changes: dict[str, Any]) -> JobSpec:
    """Apply a partial update (PATCH) to a spec; nested tables merge key by key."""
    base = spec.model_dump(mode="json")
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "labels":
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return parse_job(base)
