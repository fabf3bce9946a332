"""The process backend: the agent runs on the executor's host, in bubblewrap when it can.

Every attempt gets its own work directory (removed afterwards), its own process group, an
environment built from an allow-list, and rlimits. Where `bwrap` works, the attempt also gets
new pid, ipc, uts (and, with network "none", net) namespaces, a read-only view of the host
filesystem with the kjob home hidden, a private /tmp, and no capabilities.
See docs/sandboxes.md for what this does and does not guarantee.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import re
import resource
import shutil
import signal
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from kjob.errors import InvalidInput, ServerError
from kjob.executor.sandbox.base import Launch, Outcome, OutputSink, Sandbox
from kjob.executor.sandbox.exits import exit_reason
from kjob.executor.sandbox.output import OutputCollector
from kjob.model.durations import format_duration
from kjob.model.sizes import parse_size

log = logging.getLogger(__name__)

#: The only host variables an agent sees; everything else (tokens, database URLs) stays out.
HOST_ENV_ALLOWED = ("PATH", "LANG", "LC_ALL", "TZ")
#: Between SIGTERM and SIGKILL to the attempt's process group.
KILL_GRACE_S = 2.0
#: After the agent exits, how long its pipes may stay open (a straggler holding them).
DRAIN_S = 2.0
#: RLIMIT_CPU is a backstop for a lost executor, not the timeout: it allows this much more.
CPU_MARGIN_S = 10
#: Largest file an agent may write (RLIMIT_FSIZE).
MAX_FILE_BYTES = 1024**3
#: How long the killed process group may take to disappear (its orphans reaped by init).
GROUP_GONE_S = 2.0
#: prctl(2) options: a signal on the parent's death; orphans re-parented to us, not init.
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_LIBC = ctypes.CDLL(None, use_errno=True)
#: prlimit(1)'s option for each rlimit we set.
_PRLIMIT_OPTIONS = {
    resource.RLIMIT_CPU: "--cpu",
    resource.RLIMIT_FSIZE: "--fsize",
    resource.RLIMIT_CORE: "--core",
    resource.RLIMIT_AS: "--as",
    resource.RLIMIT_NPROC: "--nproc",
}
#: How long the bwrap self-test at start() may take.
PROBE_TIMEOUT_S = 10.0


class ProcessSandbox(Sandbox):
    """Runs agents as local processes. `hide`: host directories the agent must not read
    (the kjob home: tokens, database); they are covered by an empty tmpfs under bwrap.

    `use_bwrap=False` turns isolation off on purpose (status says so); `require_isolation`
    makes start() fail instead of running agents unisolated.
    """

    name = "process"

    def __init__(
        self,
        *,
        require_isolation: bool = False,
        hide: Sequence[Path] = (),
        use_bwrap: bool = True,
        max_file_bytes: int = MAX_FILE_BYTES,
        extra_binds: Sequence[Path] = (),
    ) -> None:
        self.require_isolation = require_isolation
        self.hide = [Path(p).resolve() for p in hide]
        self.use_bwrap = use_bwrap
        self.max_file_bytes = max_file_bytes
        self.extra_binds = [Path(p).resolve() for p in extra_binds]
        self._bwrap: str | None = None
        self._prlimit: str | None = None
        self._isolation_note = "not started"
        self._started = False

    async def start(self) -> None:
        """Find and self-test bubblewrap.

        :raises ServerError: bwrap cannot isolate here and `require_isolation` is set.
        """
        if not _become_subreaper():
            log.warning("process sandbox: cannot become a child subreaper; killed agents may linger as zombies")
        self._prlimit = shutil.which("prlimit")
        problem = await self._probe_bwrap() if self.use_bwrap else "disabled by configuration"
        if problem is None:
            self._isolation_note = "bubblewrap: pid, ipc, uts, net namespaces; read-only host filesystem"
        else:
            self._bwrap = None
            self._isolation_note = f"none: {problem}"
            if self.require_isolation:
                raise ServerError(
                    f"the process sandbox cannot isolate agents ({problem}); install bubblewrap "
                    "(apt-get install bubblewrap) or set executor.require_isolation = false"
                )
            log.warning(
                "process sandbox: agents run WITHOUT isolation (%s): they can read and write what "
                "the executor's user can, and reach the network",
                problem,
            )
        self._started = True

    async def _probe_bwrap(self) -> str | None:
        """None if bwrap runs a command with our options here, else what is wrong."""
        path = shutil.which("bwrap")
        if path is None:
            return "bwrap (bubblewrap) is not installed"
        self._bwrap = path
        cmd = self._bwrap_argv(None, network="none", program=[path, "--version"])
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                _, err = await proc.communicate()
        except (OSError, TimeoutError) as e:
            return f"bwrap self-test failed: {e}"
        if proc.returncode != 0:
            return f"bwrap self-test failed: {err.decode(errors='replace').strip() or f'exit {proc.returncode}'}"
        return None

    def status(self) -> dict[str, str]:
        return {"isolation": self._isolation_note}

    @property
    def isolated(self) -> bool:
        return self._bwrap is not None

    async def run(self, launch: Launch, on_output: OutputSink) -> Outcome:
        if not self._started:
            raise RuntimeError("ProcessSandbox.run() before start()")
        workdir = _make_workdir(launch)
        try:
            if launch.prepare is not None:  # the executor's hook: kjob.executor.agent_run
                try:
                    extra = await launch.prepare(workdir)
                except Exception as e:
                    return Outcome(start_error=str(e))
                launch = dataclasses.replace(launch, env={**launch.env, **extra})
            outcome = await self._run_in(workdir, launch, on_output)
            if launch.collect is not None:
                await launch.collect(workdir)
            return outcome
        finally:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, workdir, True))

    async def _run_in(self, workdir: Path, launch: Launch, on_output: OutputSink) -> Outcome:
        if not launch.argv:
            return Outcome(start_error="the agent command is empty; check the agent's `command`")
        env = _environment(launch, workdir)
        program = _resolve(launch.argv[0], env.get("PATH", ""), workdir)
        if program is None:
            return Outcome(
                start_error=f"agent command {launch.argv[0]!r} was not found on this node "
                f"(PATH={env.get('PATH', '')}); install it or fix the agent's `command`"
            )
        try:
            limits = self._limits(launch)
        except InvalidInput as e:
            return Outcome(start_error=str(e))
        argv = [program, *launch.argv[1:]]
        preexec: Callable[[], None] | None = partial(_apply_limits, limits)
        if self._bwrap is not None:
            argv = self._bwrap_argv(workdir, network=launch.spec.network, program=argv)
            if self._prlimit is not None:
                # prlimit sets the limits and execs bwrap (which dies with us): no preexec_fn,
                # so Python spawns with vfork instead of copying the executor's page tables.
                argv, preexec = [*_prlimit_argv(self._prlimit, limits), *argv], None
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if launch.stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=workdir,
                env=env,
                start_new_session=True,  # its own process group: a timeout kills all it started
                preexec_fn=preexec,
            )
        except (OSError, ValueError) as e:
            return Outcome(start_error=f"agent command {launch.argv[0]!r} could not start: {e}")
        return await self._watch(proc, launch, on_output)

    async def _watch(self, proc: asyncio.subprocess.Process, launch: Launch, on_output: OutputSink) -> Outcome:
        """Pump output and stdin until the agent exits or times out; then end its group."""
        collector = OutputCollector(launch.output_cap_bytes, on_output, launch.run_id)
        assert proc.stdout is not None and proc.stderr is not None
        tasks = [
            asyncio.create_task(_pump(proc.stdout, "stdout", collector)),
            asyncio.create_task(_pump(proc.stderr, "stderr", collector)),
        ]
        if proc.stdin is not None:
            tasks.append(asyncio.create_task(_feed(proc.stdin, launch.stdin or b"")))
        timed_out = False
        try:
            try:
                async with asyncio.timeout(launch.timeout.total_seconds()):
                    await proc.wait()
            except TimeoutError:
                timed_out = True
        finally:
            # Also on cancellation: nothing the attempt started may outlive it.
            await asyncio.shield(_end_group(proc))
            _, stuck = await asyncio.wait(tasks, timeout=DRAIN_S)
            for task in stuck:
                task.cancel()
        fields = await collector.finish()
        if timed_out:
            return Outcome(timed_out=True, reason=f"killed at the {format_duration(launch.timeout)} timeout", **fields)
        code = proc.returncode
        assert code is not None
        reason = exit_reason(code)
        if code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            reason = f"{reason}; the CPU time limit ({_cpu_limit_s(launch)} s) was reached"
        return Outcome(exit_code=code, reason=reason, **fields)

    def _limits(self, launch: Launch) -> list[tuple[int, int, int]]:
        """(resource, soft, hard) for the child, never above our own hard limits (raising those
        would fail). RLIMIT_CPU's soft limit sends SIGXCPU, its hard limit SIGKILL."""
        cpu = _cpu_limit_s(launch)
        limits = [
            (resource.RLIMIT_CPU, cpu, cpu + 5),
            (resource.RLIMIT_FSIZE, self.max_file_bytes, self.max_file_bytes),
            (resource.RLIMIT_CORE, 0, 0),
        ]
        if launch.spec.memory:
            size = parse_size(launch.spec.memory, "sandbox.memory")
            limits.append((resource.RLIMIT_AS, size, size))
        if launch.spec.pids:
            # Per user, not per attempt, and not enforced for root: see docs/sandboxes.md.
            limits.append((resource.RLIMIT_NPROC, launch.spec.pids, launch.spec.pids))
        return [(res, *_clamp(res, soft, hard)) for res, soft, hard in limits]

    def _bwrap_argv(self, workdir: Path | None, *, network: str, program: list[str]) -> list[str]:
        assert self._bwrap is not None
        argv = [self._bwrap, "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
        if network == "none":
            argv.append("--unshare-net")
        if os.geteuid() == 0:
            # Root keeps its capabilities in bwrap unless told; without them it cannot remount
            # the host filesystem read-write or leave the namespaces.
            argv += ["--cap-drop", "ALL"]
        argv += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        for hidden in self.hide:
            if hidden.is_dir():
                argv += ["--tmpfs", str(hidden)]
        for shared in self.extra_binds:
            argv += ["--bind", str(shared), str(shared)]
        if workdir is not None:
            argv += ["--bind", str(workdir), str(workdir), "--chdir", str(workdir)]
        return [*argv, "--", *program]


def _make_workdir(launch: Launch) -> Path:
    """`<work_root>/<run id>-<attempt>`, fresh and private (a leftover of a crash is replaced)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{launch.run_id}-{launch.attempt}")
    launch.work_root.mkdir(parents=True, exist_ok=True)
    workdir = (launch.work_root / name).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(mode=0o700)
    return workdir


def _environment(launch: Launch, workdir: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in HOST_ENV_ALLOWED if k in os.environ}
    env.setdefault("PATH", os.defpath)
    env["HOME"] = str(workdir)
    env.update(launch.env)
    return env


def _resolve(command: str, path: str, workdir: Path) -> str | None:
    """The absolute path the agent's argv[0] names, or None when there is no such program."""
    if "/" in command:
        candidate = Path(command) if command.startswith("/") else workdir / command
        return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None
    return shutil.which(command, path=path)


def _cpu_limit_s(launch: Launch) -> int:
    return int(launch.timeout.total_seconds()) + CPU_MARGIN_S


def _clamp(res: int, soft: int, hard: int) -> tuple[int, int]:
    _, ours = resource.getrlimit(res)
    if ours == resource.RLIM_INFINITY:
        return soft, hard
    return min(soft, ours), min(hard, ours)


def _prlimit_argv(prlimit: str, limits: list[tuple[int, int, int]]) -> list[str]:
    return [prlimit, *(f"{_PRLIMIT_OPTIONS[res]}={soft}:{hard}" for res, soft, hard in limits), "--"]


def _apply_limits(limits: list[tuple[int, int, int]]) -> None:
    """Runs in the child between fork and exec: die with the executor (bwrap does the same
    with --die-with-parent), and set the rlimits."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    for res, soft, hard in limits:
        resource.setrlimit(res, (soft, hard))


async def _pump(reader: asyncio.StreamReader, stream: str, collector: OutputCollector) -> None:
    while chunk := await reader.read(65536):
        await collector.feed(stream, chunk)


async def _feed(writer: asyncio.StreamWriter, data: bytes) -> None:
    # An agent may exit without reading its stdin; that is its business, not an error.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        writer.write(data)
        await writer.drain()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
        writer.close()
        await writer.wait_closed()


async def _end_group(proc: asyncio.subprocess.Process) -> None:
    """Kill the attempt's process group: SIGTERM and a grace period if the agent still runs,
    then SIGKILL for anything left (children that outlived the agent included)."""
    pgid = proc.pid  # start_new_session: the agent leads its own group
    if proc.returncode is None:
        _killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_GRACE_S):
                await proc.wait()
    _killpg(pgid, signal.SIGKILL)
    await proc.wait()
    await _wait_group_gone(pgid)


async def _wait_group_gone(pgid: int) -> None:
    """Wait until no process of the group exists, so that "ended" means ended.

    Killed orphans of the attempt (a child the agent left behind; bwrap's inner process, which
    the outer one never waits for) have been re-parented to this process, a child subreaper
    (see `_become_subreaper`): reap them here rather than wait for init to get round to it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GROUP_GONE_S
    delay = 0.001
    while _reap_group(pgid) or _group_alive(pgid):
        if loop.time() >= deadline:
            log.warning("process group %d still exists %.0f s after SIGKILL", pgid, GROUP_GONE_S)
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def _reap_group(pgid: int) -> bool:
    """Reap exited children of ours in the group; True while some of them still run.

    Only called once the group leader was reaped by asyncio, so it never takes a status
    asyncio waits for: every other member of the group belongs to the ended attempt."""
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return False  # no child of ours is left in the group
        if pid == 0:
            return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or a member now runs as another uid
        return False
    return True


def _become_subreaper() -> bool:
    """Make orphans of our descendants our children (PR_SET_CHILD_SUBREAPER), so an attempt's
    killed processes can be reaped at once instead of lingering as zombies of init."""
    return _LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
