"""The Sandbox port: run one attempt of an agent, somewhere isolated, and say how it ended."""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Awaitable, Callable, Optional

from kjob.model.job import SandboxSpec

#: Where an egress sandbox never connects: this host, its private networks, link-local
#: (cloud metadata), shared and reserved ranges. The host's own addresses are added per run.
BLOCKED_RANGES = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
)
#: Called with each chunk of output as it arrives ("stdout" | "stderr", text).
OutputSink = Callable[[str, str], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class Launch:
    """Everything a sandbox needs to run one attempt."""

    run_id: str
    tenant: str
    job_slug: str
    attempt: int
    argv: list[str]  #: the agent command, already rendered from its template
    stdin: bytes | None  #: the prompt, when the agent reads it on stdin
    env: dict[str, str]  #: the job's env plus the agent's (prompt, run id); never the host's
    spec: SandboxSpec
    timeout: timedelta
    output_cap_bytes: int
    work_root: Path  #: the executor's work area; the sandbox makes its own dir under it
    #: Called with the fresh work dir before the agent starts (a workspace clone); returns
    #: environment to add. Raising fails the attempt to start, with the error as the reason.
    prepare: Optional[Callable[[Path], Awaitable[dict[str, str]]]] = None
    #: Called with the work dir after the agent ended, before it is removed (the result file).
    collect: Optional[Callable[[Path], Awaitable[None]]] = None
    #: Called with the agent's process group as soon as it exists (backends whose agents are
    #: host processes), so the executor's watchdog can kill it should the executor be paused.
    #: When bwrap starts it, called once instead, before the spawn, with (None, the read end of
    #: bwrap's status pipe), on which the group's first pid and the agent's exit code arrive, so
    #: that the watchdog can also record an end the executor could not.
    on_spawn: Optional[Callable[[int, Optional[int]], None]] = None
    #: A warm start: the sandbox is built now, before the run is claimed, and its agent held
    #: back until this resolves True (then `on_spawn` is called and the timeout starts); False
    #: ends it unstarted, `Outcome(start_error=NOT_STARTED)`. Only where `Sandbox.gates(launch)`.
    gate: Optional["asyncio.Future[bool]"] = None
    #: The same for backends whose agents run in containers: called with the container's id
    #: once it started (the engine keeps its exit code until the container is removed).
    on_container: Optional[Callable[[str], None]] = None


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """How an attempt ended. Exactly one of: exit_code set, timed_out, start_error."""

    exit_code: int | None = None
    timed_out: bool = False
    start_error: str | None = None  #: the sandbox or agent could not start; says why
    #: The start error will not heal by waiting (a missing image or agent binary, a refused
    #: sandbox): the run ends now instead of after its retries' backoff.
    permanent: bool = False
    reason: str | None = None  #: extra detail, e.g. "OOM killed" or "memory limit 64m"
    output: str = ""  #: stdout+stderr interleaved, up to the cap
    output_bytes: int = 0  #: total produced, including what the cap dropped
    dropped_bytes: int = 0  #: produced beyond the cap: counted, never silently lost
    oom_killed: bool = False  #: the kernel killed it at its memory limit


class Sandbox(abc.ABC):
    """One backend (process, docker). Instances are shared by all runs of an executor."""

    name: str

    @abc.abstractmethod
    async def start(self) -> None:
        """Check the backend can work here (engine reachable, bwrap present); reap leftovers.

        :raises ServerError: the backend cannot run anything on this node; say what to do.
        """

    @abc.abstractmethod
    async def run(self, launch: Launch, on_output: OutputSink) -> Outcome:
        """Run one attempt to its end and return its Outcome. Never raises for agent faults:
        a failure to start is `Outcome(start_error=...)`; a timeout kills everything the attempt
        started (process group, container) before returning `Outcome(timed_out=True)`.
        Cancelling the task must also kill everything the attempt started."""

    def gates(self, launch: Launch) -> bool:
        """Whether `launch` can be built ahead of its claim with a `gate` (a warm start)."""
        return False

    async def close(self) -> None:
        """Release connections. Default: nothing to release."""

    def status(self) -> dict[str, str]:
        """Facts for `kjob status` (e.g. whether bwrap isolation is active)."""
        return {}


def network_refusal(launch: Launch, host_network_tenants: frozenset[str]) -> str | None:
    """Why this attempt may not have network "host", or None. Checked at each run (not only
    when the job was written): the operator may have changed the config since."""
    if launch.spec.network == "host" and launch.tenant not in host_network_tenants:
        return (f"sandbox.network = \"host\" is not allowed for tenant {launch.tenant!r} on this node; "
                "the operator lists such tenants in executor.host_network_tenants")
    return None
