"""Count agent executions from outside the product.

The ledger cannot tell how often an agent ran: its unique index makes a duplicate row impossible,
whatever the executors did. Here the agent itself reports: a job's prompt (`Recorder.script()`)
calls a small client that sends `start` before the work and `end` after it, over a unix socket,
to a server in the test process. The socket lives in a directory the operator shares with the
sandboxes through the existing setting `executor.extra_binds` (`Recorder.env()`), so nothing
else of the host needs to be visible to the agent.

Times are the recorder's own `time.monotonic()` at receipt (one clock for every node: the
kernel's monotonic clock is machine-wide, and untouched by `faketime` on a node); the agent's
own readings and the reporting process are kept beside them. The node is found from the
reporting process (SO_PEERCRED gives its pid in our namespace, even from inside bwrap's pid
namespace): the nearest ancestor whose environment names `KJOB_NODE_NAME`.

    with Recorder() as rec:
        env = {**rec.env(), ...}                      # for each `kjob server`
        job = create_job(..., prompt=rec.script(seconds=0.5))
        ...
        rec.by_run()[run_id]                          # the executions of one run
        rec.overlapping()                             # pairs of one run's executions overlapping
        rec.completed()                               # executions that reached their end
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import socketserver
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

_CLIENT = r'''
import json, os, socket, sys, time
event = sys.argv[1]
msg = {"event": event, "run_id": os.environ.get("KJOB_RUN_ID"), "attempt": int(os.environ.get("KJOB_ATTEMPT") or 0),
       "job": os.environ.get("KJOB_JOB"), "tenant": os.environ.get("KJOB_TENANT"), "pid": os.getppid(),
       "mono": time.monotonic(), "wall": time.time()}
# A burst of agents starting at once on a loaded machine can find the listen queue full: the
# recorder is the test's, not the product's, so its reports try again for 20 s before failing.
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rec.sock")
give_up = time.monotonic() + 20
while True:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(path)
        break
    except OSError as err:
        s.close()
        if time.monotonic() > give_up:
            sys.exit(f"recorder unreachable at {event}: {err!r}")
        time.sleep(0.05)
s.sendall(json.dumps(msg).encode() + b"\n")
if s.makefile().readline().strip() != "ok":
    sys.exit("recorder refused " + event)
if event == "start" and os.fork() == 0:
    # Hold the connection open for as long as the agent lives: killed with its process group,
    # the recorder sees the end of the connection, and knows when a killed execution died.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    s.settimeout(None)
    try:
        s.recv(1)
    finally:
        os._exit(0)
'''


@dataclass
class Execution:
    """One run of an agent process, as the agent reported it."""

    run_id: str
    attempt: int
    job: str | None
    node: str | None
    pid: int  #: the agent's shell, as the recorder sees it (host pid namespace)
    started: float  #: recorder's monotonic clock at `start`
    ended: float | None = None  #: at `end`; None: the agent never got there (killed)
    died: float | None = None  #: when the agent's process group went away without an `end`
    start_wall: float = 0.0  #: the agent's wall clock at `start` (a faked node's shows it)
    end_wall: float | None = None
    extra: dict = field(default_factory=dict)
    _holder: socket.socket | None = field(default=None, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.ended is not None

    def stopped(self, now: float) -> float:
        """When it stopped running: its end, its death, or (still running) now."""
        return self.ended if self.ended is not None else self.died if self.died is not None else now

    def overlaps(self, other: "Execution", now: float) -> bool:
        return self.started < other.stopped(now) and other.started < self.stopped(now)


def _peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def _node_of(pid: int) -> str | None:
    """KJOB_NODE_NAME of the nearest ancestor of `pid` that has one (the executor's process)."""
    for _ in range(64):
        try:  # an agent running as another user hides its environment: look further up
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            environ = []
        for item in environ:
            if item.startswith(b"KJOB_NODE_NAME="):
                return item.split(b"=", 1)[1].decode()
        ppid = peer_parent(pid)
        if not ppid or ppid <= 1:
            return None
        pid = ppid
    return None


class Recorder:
    """The server; a context manager that serves from a thread until closed."""

    def __init__(self, directory: Path | None = None) -> None:
        # A short path of its own: a unix socket path must fit in 108 bytes.
        self.dir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="kjrec-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o777)  # agents may run as another user (docker, a hardened sandbox)
        self.socket_path = self.dir / "rec.sock"
        self.client_path = self.dir / "report.py"
        self._lock = threading.Lock()
        self._executions: list[Execution] = []
        self._open: dict[tuple[str, int, int], Execution] = {}
        self._last_end: Execution | None = None
        self.errors: list[str] = []
        #: Called (in the recorder's thread) on each `end` before the agent hears back: a test
        #: can strike at the instant an attempt ends.
        self.on_end: Callable[[Execution], None] | None = None
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    # -- serving ----------------------------------------------------------------------

    def start(self) -> "Recorder":
        self.client_path.write_text(_CLIENT)
        self.socket_path.unlink(missing_ok=True)
        recorder = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline()
                received = time.monotonic()
                try:
                    execution = recorder._record(json.loads(line), _peer_pid(self.request), received, self.request)
                except Exception as err:  # tell the agent: its run then fails, visibly
                    recorder.errors.append(f"{err!r} on {line!r}")
                    self.wfile.write(b"error\n")
                    return
                hook = recorder.on_end
                if execution is None and hook is not None:
                    with contextlib.suppress(Exception):
                        hook(recorder._last_end)
                try:
                    self.wfile.write(b"ok\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):  # the agent was killed as it reported
                    if execution is not None:  # killed at its start: it died there
                        recorder._gone(execution, time.monotonic())
                    return
                if execution is not None:  # a start: the agent's holder keeps this open till it dies
                    with contextlib.suppress(OSError):
                        self.rfile.read()
                    recorder._gone(execution, time.monotonic())

        class Server(socketserver.ThreadingUnixStreamServer):
            request_queue_size = 512  # every agent of a burst connects at its start
            daemon_threads = True

        self._server = Server(str(self.socket_path), Handler)
        os.chmod(self.socket_path, 0o777)
        self._thread = threading.Thread(target=self._server.serve_forever, name="recorder", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Recorder":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _gone(self, execution: Execution, at: float) -> None:
        with self._lock:
            if execution.ended is None and execution.died is None:
                execution.died = at
                self._open = {k: v for k, v in self._open.items() if v is not execution}

    def _record(self, msg: dict, peer: int, received: float, conn: socket.socket) -> Execution | None:
        """Note one report; the new Execution on `start`."""
        event, run_id, attempt = msg["event"], msg["run_id"], int(msg["attempt"])
        if not run_id:
            raise ValueError("no KJOB_RUN_ID in the agent's environment")
        # The client's parent is the agent's shell: the same process reports start and end.
        key = (run_id, attempt, peer_parent(peer) or peer)
        with self._lock:
            if event == "start":
                execution = Execution(run_id=run_id, attempt=attempt, job=msg.get("job"), node=_node_of(peer),
                                      pid=key[2], started=received, start_wall=float(msg.get("wall") or 0))
                execution._holder = conn
                self._executions.append(execution)
                self._open[key] = execution
                return execution
            if event == "end":
                execution = self._open.pop(key, None)
                if execution is None:
                    # Its holder may have gone a moment before the `end` arrived (the agent's
                    # group being stopped as it ended): that execution did reach its end.
                    execution = next((e for e in reversed(self._executions)
                                      if (e.run_id, e.attempt, e.pid) == key and e.ended is None
                                      and e.died is not None and received - e.died < 5.0), None)
                    if execution is not None:
                        execution.died = None
                if execution is None:
                    raise ValueError(f"`end` without a `start` for {key}")
                execution.ended, execution.end_wall = received, float(msg.get("wall") or 0)
                self._last_end = execution
                if execution._holder is not None:  # let the holder go: the agent ends normally
                    with contextlib.suppress(OSError):
                        execution._holder.shutdown(socket.SHUT_RDWR)
                return None
            raise ValueError(f"unknown event {event!r}")

    # -- the agent's side ---------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The environment a `kjob server` needs so that its sandboxes can reach the recorder."""
        return {"KJOB_EXECUTOR__EXTRA_BINDS": json.dumps([str(self.dir)])}

    def script(self, seconds: float = 0.5, body: str = "") -> str:
        """A shell agent's prompt: report the start, work `seconds` (then `body`), report the end."""
        report = f"python3 -I -S {shlex.quote(str(self.client_path))}"
        work = f"sleep {seconds}" + (f"; {body}" if body else "")
        return f"{report} start || exit 97\n{work}\n{report} end || exit 98\n"

    # -- answers --------------------------------------------------------------------------

    def executions(self) -> list[Execution]:
        with self._lock:
            return [Execution(**{**vars(e), "_holder": None}) for e in self._executions]

    def by_run(self) -> dict[str, list[Execution]]:
        runs: dict[str, list[Execution]] = {}
        for execution in self.executions():
            runs.setdefault(execution.run_id, []).append(execution)
        return runs

    def completed(self) -> list[Execution]:
        return [e for e in self.executions() if e.finished]

    def overlapping(self) -> list[tuple[Execution, Execution]]:
        """Pairs of executions of one run whose times overlap (a running one counts till now)."""
        now = time.monotonic()
        pairs = []
        for runs in self.by_run().values():
            for i, a in enumerate(runs):
                pairs += [(a, b) for b in runs[i + 1:] if a.overlaps(b, now)]
        return pairs

    @staticmethod
    def wall_at(mono: float) -> float:
        """The recorder's (true) wall clock at one of its monotonic readings."""
        return time.time() - (time.monotonic() - mono)

    def running(self) -> list[Execution]:
        """Executions that neither reached their end nor died (yet)."""
        return [e for e in self.executions() if not e.finished and e.died is None]


def peer_parent(pid: int) -> int | None:
    """The parent of `pid` (the agent's shell, for the client it runs), None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), None)
