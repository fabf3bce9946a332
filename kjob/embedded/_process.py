"""A server child process that cannot outlive kjob.

Both embedded servers run as children of the kjob process, never as daemons:

- each child gets PR_SET_PDEATHSIG, so the kernel signals it when kjob dies, even by SIGKILL;
- the signal is tied to the *thread* that forked the child, not the process, so every child is
  forked from one long-lived spawner thread (a child forked from a short-lived worker thread,
  e.g. one of `asyncio.to_thread`, would be killed the moment that thread exits);
- each child leads its own process group (a terminal's Ctrl-C reaches kjob only, which then
  stops the servers in order), and `kill()` signals the whole group, so a killed PostgreSQL
  leaves no backends behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kjob.errors import ServerError

_PR_SET_PDEATHSIG = 1
# Loaded in the parent: the forked child must not dlopen or look symbols up (locks may be held).
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None

_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on `port`. Bound as nats-server and PostgreSQL bind
    (SO_REUSEADDR): the closed connections of a server's last run, in TIME_WAIT, do not make
    its port taken; a listener does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _spawn(fn: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Run `fn` (which forks) on the spawner thread; see the module docstring for why."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kjob-spawner")
    return _spawner.submit(fn).result()


def die_with_parent(death_signal: int, parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody will signal us.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def _children(pid: int) -> list[int]:
    """The direct children of process `pid` (empty where /proc cannot tell)."""
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(child) for child in (task / "children").read_text().split()]
    except OSError:
        pass
    return found


class ChildProcess:
    """One server process: started, watched, stopped (signal, then SIGKILL) or killed.

    `stop_signal` asks the server to shut down cleanly; it is also the death signal, so a
    dying kjob gives its servers the same clean shutdown.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        stop_signal: int = signal.SIGTERM,
        user: int | None = None,
        group: int | None = None,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.stop_signal = stop_signal
        self.user = user
        self.group = group
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and not self._exited()

    def start(self) -> None:
        """Fork the server. Its stdout and stderr are appended to `log_path`."""
        if self.running:
            return
        if self._proc is not None:
            self._proc.wait()  # it exited on its own: reap it before starting anew
            self._proc = None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            preexec = die_with_parent(self.stop_signal, os.getpid())

            def popen() -> subprocess.Popen[bytes]:
                return subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.cwd,
                    env=self.env,
                    start_new_session=True,
                    preexec_fn=preexec,
                    user=self.user,
                    # Drop root's groups too: `user=` alone keeps gid 0 and root's supplementary groups.
                    group=self.group,
                    extra_groups=[] if self.user is not None else None,
                )

            try:
                self._proc = _spawn(popen)
            except OSError as exc:
                raise ServerError(f"could not start {self.name} ({self.argv[0]}): {exc}") from exc

    def wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        """Poll `ready()` until it is true. Raise ServerError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                code = self._proc.wait() if self._proc is not None else None
                self._proc = None
                raise ServerError(
                    f"{self.name} exited with code {code} while starting; "
                    f"its log ({self.log_path}) ends with:\n{self.log_tail()}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise ServerError(
                    f"{self.name} did not become ready within {timeout:g}s and was killed; "
                    f"its log ({self.log_path}) ends with:\n{self.log_tail()}"
                )
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to shut down; SIGKILL its process group if it takes longer than `timeout`."""
        if self._proc is None:
            return
        if not self._exited():
            self._proc.send_signal(self.stop_signal)
            deadline = time.monotonic() + timeout
            while not self._exited() and time.monotonic() < deadline:
                time.sleep(0.01)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the server and everything it forked, as a crash would. Chaos tests use this.

        Also the last step of `stop()`: a PostgreSQL backend still running after its postmaster
        exited would hold the data directory and block the next start.
        """
        if self._proc is None:
            return
        if self._proc.returncode is None:
            # Not reaped yet, so the pid (the group id) cannot have been reused by anyone else.
            # PostgreSQL backends lead process groups of their own (so that the postmaster can
            # signal their children), so the group alone misses them: stop the server, so it
            # forks no more and reaps none (their pids stay theirs), and kill its children too.
            pid = self._proc.pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            for child in _children(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self._proc.wait()
        self._proc = None

    def _exited(self) -> bool:
        """Whether the process has exited, *without* reaping it (the group id stays reserved)."""
        assert self._proc is not None
        if self._proc.returncode is not None:
            return True
        if not hasattr(os, "waitid"):
            return self._proc.poll() is not None
        try:
            info = os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self._proc.poll() is not None
        return info is not None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class EmbeddedServer:
    """What the embedded servers share: one `ChildProcess` (`self._process`) behind them, its
    state, its log, stop/kill, and use as a context manager (`start()` is the server's own)."""

    _process: ChildProcess

    def start(self, timeout: float = 10.0) -> "EmbeddedServer":  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.running

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the server logged (its stdout and stderr, kept in its data dir)."""
        return self._process.log_tail(lines)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down with the server's clean-stop signal, or SIGKILL after `timeout` seconds."""
        self._process.stop(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would (the server's children too); the next start recovers."""
        self._process.kill()

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.stop()
