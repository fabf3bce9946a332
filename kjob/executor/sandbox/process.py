"""The process backend: the agent runs on the executor's host, in bubblewrap when it can.

Every attempt gets its own work directory (removed afterwards), its own process group, an
environment built from an allow-list, and rlimits. Where `bwrap` works, the attempt also gets
new user, pid, ipc, uts and net namespaces, a read-only view of the system directories only
(no /run, /var, /home, host /tmp or kjob home), a size-limited tmpfs as its work dir and /tmp,
no capabilities and, when the executor is root, a uid of its own.

The programs that run on the host side of the boundary (prlimit, setpriv, pasta, bwrap) get a
fixed environment: the job's variables are handed to bwrap through a memfd (`--args`) and set
with `--clearenv --setenv` inside the sandbox, so neither a loader variable can reach a host
program nor a secret show up in a host command line. See docs/sandboxes.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import logging
import os
import re
import resource
import shutil
import signal
import sys
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path

from kjob.errors import InvalidInput, ServerError
from kjob.executor.sandbox.base import BLOCKED_RANGES, Launch, Outcome, OutputSink, Sandbox, network_refusal
from kjob.executor.sandbox.cgroups import MemoryCgroups, joining_argv
from kjob.executor.sandbox.exits import exit_reason, oom_reason
from kjob.executor.sandbox.output import OutputCollector
from kjob.executor.sandbox import staging
from kjob.model.durations import format_duration
from kjob.model.sizes import parse_size

log = logging.getLogger(__name__)

#: The only host variables an agent sees; everything else (tokens, database URLs) stays out.
HOST_ENV_ALLOWED = ("PATH", "LANG", "LC_ALL", "TZ")
#: The whole environment of every host-side program of the launcher (prlimit, setpriv, pasta,
#: bwrap): fixed, so nothing of the job (LD_PRELOAD, LD_AUDIT, GCONV_PATH, ...) can reach them.
LAUNCHER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
#: What of the host an isolated agent sees, read-only: programs, libraries and /etc. Not /run,
#: /var, /home, /root, /srv, /mnt or /tmp: sockets, other users' files and kjob's state live there.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")
#: Processes one attempt may have when the job sets no `pids` (as the docker backend).
DEFAULT_PIDS = 256
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
#: A warm start's gate (`Launch.gate`), the sandbox's first program: it waits for "go" on its
#: stdin, a pipe only the executor writes, then execs the agent with /dev/null for stdin. At
#: end of file (the executor died, or the run is not to start) it exits unstarted: unlike
#: bwrap's --block-fd, which runs the command at end of file too.
GATE_ARGV = ["/bin/sh", "-c", 'IFS= read -r go; [ "$go" = go ] || exit 125; exec </dev/null; exec "$@"', "kjob-gate"]
#: A gated attempt that did not start (the gate closed or the sandbox ended first).
NOT_STARTED = "the sandbox was built ahead and its agent not started"


class ProcessSandbox(Sandbox):
    """Runs agents as local processes. `hide`: host paths the agent must not read (the kjob
    home: tokens, database; the config file), covered under bwrap where a visible dir holds them.

    `use_bwrap=False` turns isolation off on purpose (status says so); `require_isolation`
    makes start() fail instead of running agents unisolated. `disk_bytes` sizes the work dir
    and /tmp (each); `uid_base` is where the per-attempt uids start when we are root.
    `host_network_tenants` may use network "host"; "egress" needs pasta (passt).
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
        host_network_tenants: Sequence[str] = (),
        disk_bytes: int = 512 * 1024**2,
        uid_base: int = 200_000,
    ) -> None:
        self.require_isolation = require_isolation
        self.host_network_tenants = frozenset(host_network_tenants)
        self.disk_bytes = disk_bytes
        self._uids = UidPool(uid_base) if os.geteuid() == 0 else None
        self._egress: Egress | None = None
        self._memory: MemoryCgroups | None = None
        self.hide = [Path(p).resolve() for p in hide]
        self.use_bwrap = use_bwrap
        self.max_file_bytes = max_file_bytes
        self.extra_binds = [Path(p).resolve() for p in extra_binds]
        self._bwrap: str | None = None
        self._prlimit: str | None = None
        self._isolation_note = "not started"
        self._started = False
        self._staging = staging.StagingPool(disk_bytes)

    async def start(self) -> None:
        """Find and self-test bubblewrap.

        :raises ServerError: bwrap cannot isolate here and `require_isolation` is set.
        """
        _watch_children_by_pidfd()
        if not _become_subreaper():
            log.warning("process sandbox: cannot become a child subreaper; killed agents may linger as zombies")
        await asyncio.to_thread(staging.sweep, self._staging.root)
        self._prlimit = shutil.which("prlimit")
        self._setpriv = shutil.which("setpriv")
        problem = await self._probe_bwrap() if self.use_bwrap else "disabled by configuration"
        if problem is None:
            self._egress = Egress.find()
            self._memory = MemoryCgroups.find() if os.geteuid() == 0 else None
            who = "a uid of its own per attempt" if self._uids is not None else "the executor's uid"
            self._isolation_note = (
                f"bubblewrap: user, pid, ipc, uts, net namespaces; system dirs read-only, no /run, /var, "
                f"/home or kjob home; tmpfs work dir and /tmp; {who}; memory "
                + ("by cgroup" if self._memory else "by address-space rlimit") + "; egress network "
                + ("via pasta" if self._egress else "unavailable (install passt)")
            )
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

    async def close(self) -> None:
        self._staging.close()

    async def _probe_bwrap(self) -> str | None:
        """None if bwrap runs a command with our options here, else what is wrong."""
        path = shutil.which("bwrap")
        if path is None:
            return "bwrap (bubblewrap) is not installed"
        self._bwrap = path
        if self._uids is not None and self._setpriv is None:
            return "setpriv (util-linux) is missing: agents would run as root"
        uid = self._uids.take() if self._uids is not None else None
        try:
            with self._launcher(None, network="none", uid=uid, env={}, program=["/bin/true"], limits=[]) as (cmd, fds):
                # A group of its own, as an attempt's: bwrap's inner process, re-parented to us
                # (a subreaper), is reaped with the group instead of staying a zombie.
                proc = await asyncio.create_subprocess_exec(
                    *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE, env=LAUNCHER_ENV, cwd="/", pass_fds=fds,
                    start_new_session=True,
                )
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                _, err = await proc.communicate()
            await _end_group(proc)
        except (OSError, TimeoutError) as e:
            return f"bwrap self-test failed: {e}"
        finally:
            if uid is not None and self._uids is not None:
                self._uids.give(uid)
        if proc.returncode != 0:
            return f"bwrap self-test failed: {err.decode(errors='replace').strip() or f'exit {proc.returncode}'}"
        return None

    def status(self) -> dict[str, str]:
        return {"isolation": self._isolation_note}

    @property
    def memory_cgroups(self) -> bool:
        """Whether `sandbox.memory` is a memory cgroup here (else an address-space rlimit)."""
        return self._memory is not None

    @property
    def isolated(self) -> bool:
        return self._bwrap is not None

    async def run(self, launch: Launch, on_output: OutputSink) -> Outcome:
        if not self._started:
            raise RuntimeError("ProcessSandbox.run() before start()")
        if refused := network_refusal(launch, self.host_network_tenants):
            return Outcome(start_error=refused, permanent=True)
        if launch.spec.network == "egress" and self._bwrap is not None and self._egress is None:
            return Outcome(start_error="sandbox.network = \"egress\" needs pasta on this node (apt-get install passt)")
        workdir = self._workdir(launch)
        uid = self._uids.take() if self._uids is not None and self._bwrap is not None else None
        #: the prepared work dir on the host (bwrap), this call's own: a warm start and the cold
        #: start replacing it may run for the same attempt at once
        host_staged: Path | None = None
        try:
            staged = workdir
            if launch.prepare is not None:  # the executor's hook: kjob.executor.agent_run
                if self._bwrap is not None:
                    # Prepared outside the work root, which the attempt's uid may not traverse;
                    # bound at the work dir's path inside. Its bound holds here too: a tmpfs of
                    # sandbox_disk where the executor may mount (staging.py).
                    staged = host_staged = self._staging.take()
                try:
                    extra = await launch.prepare(staged)
                except Exception as e:
                    return Outcome(start_error=str(e))
                extra = {k: v.replace(str(staged), str(workdir), 1) for k, v in extra.items()}
                launch = dataclasses.replace(launch, env={**launch.env, **extra})
                if uid is not None:  # the prepared work dir is the attempt's own, like the tmpfs would be
                    # $KJOB_RESULT's dir: a few syscalls, no thread; a workspace clone: a thread.
                    if not staging.chown_small_tree(staged, uid):
                        await asyncio.to_thread(staging.chown_tree, staged, uid)
            outcome = await self._run_in(workdir, launch, on_output, uid, host_staged)
            if launch.collect is not None:
                await launch.collect(staged)
            return outcome
        finally:
            if uid is not None and self._uids is not None:
                self._uids.give(uid)  # the attempt's process group is gone: nothing runs as it
            await self._remove(workdir, host_staged)

    def _workdir(self, launch: Launch) -> Path:
        """The attempt's work dir: made on the host without bwrap; under bwrap only a path,
        which bwrap makes inside (the host dir would be an empty mount point), unless the work
        root is in a dir the sandbox sees read-only, where bwrap could not make it."""
        path = _workdir_path(launch)
        if self._bwrap is None or self._visible(str(path.parent)):
            try:
                _fresh_dir(path)
            except FileNotFoundError:  # the work root went away since it was made: make it again
                _work_root.cache_clear()
                path = _fresh_dir(_workdir_path(launch))
        return path

    async def _remove(self, workdir: Path, staged: Path | None) -> None:
        """What the attempt leaves on the host goes: on the spot where it is a few entries (a
        worker thread costs the executor more than the removals do), else in one trip to a
        thread. A staged dir of a few entries is emptied and pooled for the next attempt."""
        if staged is not None and self._staging.give(staged):
            staged = None
        if staged is None and staging.removed_if_empty(workdir):
            return
        await asyncio.shield(asyncio.to_thread(_remove_dirs, workdir, staged))

    async def _run_in(self, workdir: Path, launch: Launch, on_output: OutputSink, uid: int | None,
                      staged: Path | None) -> Outcome:
        if not launch.argv:
            return Outcome(start_error="the agent command is empty; check the agent's `command`", permanent=True)
        env = _environment(launch, workdir)
        program = _resolve(launch.argv[0], env.get("PATH", ""), workdir)
        if program is None:
            return Outcome(
                start_error=f"agent command {launch.argv[0]!r} was not found on this node "
                f"(PATH={env.get('PATH', '')}); install it or fix the agent's `command`",
                permanent=True,
            )
        if self._bwrap is not None and not self._visible(program):
            return Outcome(
                start_error=f"agent command {launch.argv[0]!r} is {program}, which sandboxes do not see; install it "
                f"under one of {', '.join(SYSTEM_DIRS)} or share its directory with executor.extra_binds",
                permanent=True,
            )
        cgroup = None
        try:
            if self._memory is not None and self._bwrap is not None and launch.spec.memory:
                size = parse_size(launch.spec.memory, "sandbox.memory")
                try:
                    # A warm start's own name: the cold start replacing it may exist at once.
                    name = f"{launch.run_id}-{launch.attempt}" + ("-warm" if launch.gate is not None else "")
                    cgroup = self._memory.create(name, size)
                except OSError as e:
                    log.warning("process sandbox: no memory cgroup for run %s (%s); using RLIMIT_AS", launch.run_id, e)
            limits = self._limits(launch, address_space=cgroup is None)
        except InvalidInput as e:
            return Outcome(start_error=str(e))
        try:
            outcome = await self._spawn(workdir, launch, on_output, uid, env, program, limits, cgroup, staged)
        finally:
            if cgroup is not None and self._memory is not None:
                self._memory.remove(cgroup)  # the attempt's processes are gone
        return outcome

    async def _spawn(
        self, workdir: Path, launch: Launch, on_output: OutputSink, uid: int | None, env: dict[str, str],
        program: str, limits: list[tuple[int, int, int]], cgroup: Path | None, staged: Path | None,
    ) -> Outcome:
        argv = [program, *launch.argv[1:]]
        stdin = asyncio.subprocess.PIPE if launch.stdin is not None else asyncio.subprocess.DEVNULL
        out = asyncio.subprocess.PIPE
        gate = None
        if launch.gate is not None:
            if not self.gates(launch):
                return Outcome(start_error=f"{NOT_STARTED}: this sandbox cannot hold an agent back")
            gate = os.pipe()
            stdin, argv = gate[0], [*GATE_ARGV, *argv]
        # bwrap writes the agent's exit code here as the agent ends: the watchdog reads it, and
        # so knows of an end this executor, paused or dead, could not record (watchdog.py).
        # Our copy of the read end stays open until the agent is gone: bwrap never writes to
        # a pipe without a reader.
        status = os.pipe() if self._bwrap is not None and launch.on_spawn is not None else None
        try:
            try:
                if self._bwrap is None:
                    # No boundary to keep: the agent itself is the program, with its own environment.
                    proc = await asyncio.create_subprocess_exec(
                        *argv, stdin=stdin, stdout=out, stderr=out, cwd=workdir, env=env,
                        start_new_session=True, preexec_fn=partial(_apply_limits, limits),
                    )
                else:
                    if status is not None and gate is None:  # only made for an on_spawn hook
                        launch.on_spawn(None, status[0])  # watched from before it exists
                    with self._launcher(workdir, network=launch.spec.network, uid=uid, env=env, program=argv,
                                        staged=staged, limits=limits, cgroup=cgroup,
                                        status_fd=status[1] if status else None) as (cmd, fds):
                        # prlimit sets the limits and execs the rest (bwrap dies with us): no preexec_fn,
                        # so Python spawns with vfork instead of copying the executor's page tables.
                        proc = await asyncio.create_subprocess_exec(
                            *cmd, stdin=stdin, stdout=out, stderr=out, cwd="/", env=LAUNCHER_ENV,
                            start_new_session=True,  # its own process group: a timeout kills all it started
                            pass_fds=fds,
                            preexec_fn=None if self._prlimit else partial(_apply_limits, limits),
                        )
            except (OSError, ValueError) as e:
                return Outcome(start_error=f"agent command {launch.argv[0]!r} could not start: {e}")
            finally:
                if status is not None:
                    os.close(status[1])
                if gate is not None:
                    os.close(gate[0])
            if gate is not None:
                write_end, gate, opened = gate[1], None, False
                try:
                    # Watched from before its agent can start.
                    arm = partial(launch.on_spawn, None, status[0]) if status is not None else None
                    opened = await _open_gate(proc, launch.gate, write_end, arm)
                finally:  # also on cancellation: a sandbox built ahead never outlives its attempt
                    if not opened:
                        await asyncio.shield(_end_group(proc))
                if not opened:
                    return Outcome(start_error=NOT_STARTED)
            if launch.on_spawn is not None and status is None:
                # start_new_session: the agent leads its own group. With the status pipe the
                # watchdog learns the group from bwrap's first report: one message fewer per run.
                launch.on_spawn(proc.pid, None)
            outcome = await self._watch(proc, launch, on_output)
        finally:
            if status is not None:
                os.close(status[0])
            if gate is not None:  # not spawned
                os.close(gate[1])
        if cgroup is not None and outcome.exit_code is not None and MemoryCgroups.oom_kills(cgroup):
            outcome = dataclasses.replace(outcome, reason=oom_reason(outcome.exit_code, launch.spec.memory),
                                          oom_killed=True)
        return outcome

    def gates(self, launch: Launch) -> bool:
        """Whether this attempt can be built ahead, its agent held back by `Launch.gate`: under
        bubblewrap, with no stdin to feed (the gate reads the sandbox's), and no host work dir
        (one the cold start replacing it would share)."""
        return (self._bwrap is not None and launch.stdin is None
                and not self._visible(str(_workdir_path(launch).parent)))

    def _visible(self, program: str) -> bool:
        real = Path(os.path.realpath(program))
        return any(real.is_relative_to(d) for d in _real_dirs((*SYSTEM_DIRS, *map(str, self.extra_binds))))

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

    def _limits(self, launch: Launch, *, address_space: bool = True) -> list[tuple[int, int, int]]:
        """(resource, soft, hard) for the child, never above our own hard limits (raising those
        would fail). RLIMIT_CPU's soft limit sends SIGXCPU, its hard limit SIGKILL."""
        cpu = _cpu_limit_s(launch)
        limits = [
            (resource.RLIMIT_CPU, cpu, cpu + 5),
            (resource.RLIMIT_FSIZE, self.max_file_bytes, self.max_file_bytes),
            (resource.RLIMIT_CORE, 0, 0),
        ]
        if launch.spec.memory and address_space:  # else a memory cgroup bounds it
            size = parse_size(launch.spec.memory, "sandbox.memory")
            limits.append((resource.RLIMIT_AS, size, size))
        pids = launch.spec.pids or (DEFAULT_PIDS if self._uids is not None and self._bwrap is not None else None)
        if pids:
            # Counted per uid: an attempt of its own uid (executor root + bwrap) has a bound of its
            # own; otherwise all processes of the executor's user count (docs/sandboxes.md).
            limits.append((resource.RLIMIT_NPROC, pids, pids))
        return [(res, *_clamp(res, soft, hard)) for res, soft, hard in limits]

    @contextlib.contextmanager
    def _launcher(
        self, workdir: Path | None, *, network: str, uid: int | None, env: Mapping[str, str], program: list[str],
        limits: list[tuple[int, int, int]], cgroup: Path | None = None, staged: Path | None = None,
        status_fd: int | None = None,
    ) -> Iterator[tuple[list[str], tuple[int, ...]]]:
        """(argv, fds to pass) of the host-side chain: [join cgroup] [prlimit] [setpriv] [pasta] bwrap.

        bwrap's own options, the job's environment among them, travel in a memfd (`--args`):
        not in any host process's environment or command line. The fd closes on exit."""
        assert self._bwrap is not None
        fd = os.memfd_create("kjob-bwrap-args", os.MFD_CLOEXEC)
        try:
            options = self._bwrap_options(workdir, network=network, uid=uid, env=env, staged=staged,
                                          supervised=status_fd is not None)
            if status_fd is not None:
                options = ["--json-status-fd", str(status_fd), *options]
            os.write(fd, b"".join(o.encode() + b"\0" for o in options))
            os.lseek(fd, 0, os.SEEK_SET)
            chain: list[str] = joining_argv(cgroup) if cgroup is not None else []
            if self._prlimit is not None:
                chain += _prlimit_argv(self._prlimit, limits)
            if uid is not None:
                assert self._setpriv is not None
                # Root hands the attempt to a uid of its own before anything of the sandbox runs:
                # bwrap then builds it unprivileged, in a user namespace.
                chain += [self._setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                          "--inh-caps=-all", "--bounding-set=-all", "--"]
            if network == "egress":
                assert self._egress is not None
                chain += self._egress.argv()
            passed = (fd,) if status_fd is None else (fd, status_fd)
            yield [*chain, self._bwrap, "--args", str(fd), "--", *program], passed
        finally:
            os.close(fd)

    def _bwrap_options(self, workdir: Path | None, *, network: str, uid: int | None, env: Mapping[str, str],
                       staged: Path | None = None, supervised: bool = False) -> list[str]:
        # The agent's uid inside is its uid outside (under pasta it would otherwise show as 0).
        ids = (str(os.geteuid()), str(os.getegid())) if uid is None else (str(uid), str(uid))
        # With a watchdog (status_fd), the agent outlives a killed executor until its claim's
        # deadline, as under a paused one: one that ends meanwhile has its end written, the
        # watchdog kills the rest then (watchdog.py). Without, bwrap dies with its executor.
        argv = [] if supervised else ["--die-with-parent"]
        argv += ["--unshare-user", "--disable-userns", "--uid", ids[0], "--gid", ids[1], "--unshare-pid",
                "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--cap-drop", "ALL"]
        if network == "none":
            argv.append("--unshare-net")
        # egress: the namespace pasta made (bwrap keeps it); host: the node's own.
        for top in SYSTEM_DIRS:
            if os.path.islink(top):
                argv += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                argv += ["--ro-bind", top, top]
        argv += ["--dev", "/dev", "--proc", "/proc"]
        argv += ["--size", str(self.disk_bytes), "--perms", "1777", "--tmpfs", "/tmp"]
        for shared in self.extra_binds:
            argv += ["--bind", str(shared), str(shared)]
        for hidden in self.hide:
            if hidden.exists() and self._visible(str(hidden)):
                cover = ["--size", "1048576", "--tmpfs"] if hidden.is_dir() else ["--ro-bind", "/dev/null"]
                argv += [*cover, str(hidden)]
        if workdir is not None and staged is not None:
            # The executor prepared it (a workspace clone, $KJOB_RESULT) and reads it back after:
            # a host dir of the attempt's uid, on a tmpfs of sandbox_disk where the executor may
            # mount one (root), else bounded only by the clone's cap (docs/sandboxes.md).
            argv += ["--bind", str(staged), str(workdir), "--chdir", str(workdir)]
        elif workdir is not None:
            # A tmpfs, not the host dir: its size is bounded and nothing of it reaches the host disk.
            argv += ["--size", str(self.disk_bytes), "--perms", "0700", "--tmpfs", str(workdir), "--chdir", str(workdir)]
        argv.append("--clearenv")
        for key, value in env.items():
            argv += ["--setenv", key, value]
        return argv


class UidPool:
    """Uids for attempts in flight, one each, from `base` up: an attempt's processes are its
    own (RLIMIT_NPROC counts them alone; no other attempt can signal or trace them)."""

    def __init__(self, base: int) -> None:
        self.base = base
        self._used: set[int] = set()

    def take(self) -> int:
        uid = next(u for u in itertools.count(self.base) if u not in self._used)
        self._used.add(uid)
        return uid

    def give(self, uid: int) -> None:
        self._used.discard(uid)

def _remove_dirs(workdir: Path, staged: Path | None) -> None:
    if staged is not None:
        staging.remove(staged)
    staging.remove_dir(workdir)


@functools.lru_cache(maxsize=16)
def _real_dirs(dirs: tuple[str, ...]) -> tuple[str, ...]:
    """What the sandbox's visible dirs resolve to: fixed while the executor runs (its own
    system dirs and configured binds), so resolved once, not at every spawn."""
    return tuple(os.path.realpath(d) for d in dirs)


@functools.lru_cache(maxsize=16)
def _work_root(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def _workdir_path(launch: Launch) -> Path:
    """`<work_root>/<run id>-<attempt>`."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{launch.run_id}-{launch.attempt}")
    return _work_root(launch.work_root) / name


def _fresh_dir(path: Path) -> Path:
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:  # a leftover of a crash
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700)
    return path


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


async def _open_gate(proc: asyncio.subprocess.Process, gate: asyncio.Future, write_end: int,
                     arm: Callable[[], None] | None) -> bool:
    """Wait for the warm start's verdict; True once `arm()` was called and "go" written to the
    gate. False (the gate closed unopened) if the verdict is no, or the sandbox ended first."""
    try:
        ended = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait({gate, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if proc.returncode is not None or not gate.done() or gate.cancelled() or gate.exception() or not gate.result():
            return False
        if arm is not None:
            arm()
        os.write(write_end, b"go\n")
        return True
    finally:
        os.close(write_end)


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


def _watch_children_by_pidfd() -> None:
    """Learn of each agent's exit from a pidfd in the event loop, not from a thread started per
    child to block in waitpid: at 100 runs/s those threads were an eighth of the executor's CPU.
    Python 3.12 does this by itself (and deprecates setting a watcher)."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:  # a kernel before 5.3, or a seccomp filter, refuses it: keep the threads then
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return
    policy = asyncio.get_event_loop_policy()
    if not isinstance(policy.get_child_watcher(), _PidfdWatcher):
        policy.set_child_watcher(_PidfdWatcher())


class _PidfdWatcher(asyncio.AbstractChildWatcher):
    """A child's exit, by its pidfd, in the loop that started it (whichever loop that is:
    3.11's own PidfdChildWatcher serves only the loop it was attached to)."""

    def add_child_handler(self, pid, callback, *args) -> None:
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(pid)
        loop.add_reader(pidfd, self._exited, loop, pid, pidfd, callback, args)

    @staticmethod
    def _exited(loop, pid, pidfd, callback, args) -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped elsewhere: its status is lost
            code = 255
        callback(pid, code, *args)

    def remove_child_handler(self, pid) -> bool:
        return False

    def attach_loop(self, loop) -> None:
        pass

    def is_active(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _become_subreaper() -> bool:
    """Make orphans of our descendants our children (PR_SET_CHILD_SUBREAPER), so an attempt's
    killed processes can be reaped at once instead of lingering as zombies of init."""
    return _LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


#: The interface pasta makes in the sandbox's network namespace.
EGRESS_IFNAME = "kjob0"


class Egress:
    """The `egress` network of the process backend: pasta (passt) gives the sandbox a network
    namespace whose traffic leaves through ordinary sockets of this host, IPv4 only, with no
    port forwarded in either direction and no gateway mapped to the host's loopback. Before
    the agent starts, a shell in that namespace (pasta's user namespace: not the agent's)
    replaces its routes: everything goes out, except BLOCKED_RANGES and the host's own
    addresses, which are `prohibit` routes (connect() fails at once with EACCES). The agent
    gets no capability over that namespace, so it cannot change them."""

    def __init__(self, pasta: str) -> None:
        self.pasta = pasta

    @classmethod
    def find(cls) -> Egress | None:
        pasta = shutil.which("pasta")
        return cls(pasta) if pasta and shutil.which("ip") else None

    def argv(self) -> list[str]:
        routes = ["route flush table main", f"route add default dev {EGRESS_IFNAME}"]
        routes += [f"route add prohibit {net}" for net in (*BLOCKED_RANGES, *(f"{a}/32" for a in host_addresses()))]
        script = "set -e\nip -batch - <<'EOF'\n" + "\n".join(routes) + "\nEOF\nexec \"$@\""
        return [
            self.pasta, "--config-net", "--ipv4-only", "--no-map-gw", "--no-dhcp", "--quiet", "--foreground",
            "--tcp-ports", "none", "--udp-ports", "none", "--tcp-ns", "none", "--udp-ns", "none",
            "--ns-ifname", EGRESS_IFNAME, "--", "/bin/sh", "-c", script, "kjob-egress",
        ]


def host_addresses() -> list[str]:
    """This host's own IPv4 addresses (the kernel's LOCAL routes), outside 127/8: a public
    address of the node reaches its services as well as its loopback does."""
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        return []
    found = {
        prev.split()[-1] for prev, line in zip(lines, lines[1:])
        if line.strip() == "/32 host LOCAL" and not prev.split()[-1].startswith("127.")
    }
    return sorted(found)
