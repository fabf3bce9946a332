"""A dead man's switch for agents: a small process of its own that kills an attempt's agent
when its executor stops extending the attempt's deadline, and writes down the end of an agent
that ran to it while its executor could not.

The executor stops an agent itself before the agent's claim can lapse (ClaimKeeper). That
needs the executor to run: an executor that is paused (SIGSTOP, a debugger, a frozen cgroup)
stops nothing, its agents go on, the claim lapses and another executor runs the attempt again
beside them. The watchdog is a separate process, in a session of its own, so a pause of the
executor does not pause it: each attempt is armed with its process group and a deadline on
the host's monotonic clock (shared by every process of the host), the executor extends the
deadline at every renewal of the claim, and a deadline that passes kills the group.

An agent that ends while its executor is paused or dead has run: its attempt must not run
again because nobody wrote that down. bwrap reports the agent's exit code on a status pipe
(`--json-status-fd`) whose read end the executor hands over at arm time; the executor disarms
only once it has written the end itself. So an armed attempt whose agent ended, when its
deadline passes or its executor dies, is one whose end only the watchdog knows: it writes the
exit code on the attempt's row (`run_attempts.agent_exit_code`), while the claim is still
that executor's, and the executor that takes the claim over concludes the attempt from it
instead of running the agent again (kjob.store.claims.ClaimLedger.claim).

A docker-backend agent is armed by its container (`c:ID`): the engine keeps an exited
container's exit code until the executor removes it, so the watchdog asks the engine
(`docker URL`) instead of a pipe, and kills the container the same way.

Protocol: SOCK_SEQPACKET messages on fd 0, of one or more lines: `db DSN`; `docker URL`; `arm
KEY TARGET DEADLINE [RUN ATTEMPT NODE]` (TARGET: a process group, `c:` and a container id, or
`-` not yet known), with the status pipe as an SCM_RIGHTS fd the first time (one `arm` a
message); `disarm KEY [KEY ...]`. End of input
(the executor died): its agents run on to their deadlines, as if it were paused (their claims
hold till then), and an end reached meanwhile is written at once; then the watchdog exits.

Only the standard library is imported, and asyncpg for the one session that writes ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http.client
import json
import logging
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: An attempt armed before its agent's process group exists (bwrap's status pipe tells it).
_UNKNOWN = "-"
#: How long an end is tried to be written while the database is away.
WRITE_FOR_S = 120.0
#: Disarms wait this long for a message to ride with (an arm, usually): one wakeup of the
#: watchdog fewer per attempt at load. Late is harmless: the attempt's deadline is its lease.
DISARM_WAIT_S = 0.05

#: The attempt is still its executor's (its claim has not been taken over): the agent's end is
#: that attempt's. The run row is locked, so a takeover waits for this and then sees the end.
_RECORD_END_SQL = """
WITH r AS (
    SELECT id FROM job_runs
    WHERE id = $1 AND attempt = $2 AND claimed_by = $3 AND status = 'running'
    FOR UPDATE
)
UPDATE run_attempts a SET agent_exit_code = $4, agent_ended_at = now() - make_interval(secs => $5)
WHERE a.run_id = $1 AND a.attempt = $2 AND a.finished_at IS NULL AND EXISTS (SELECT 1 FROM r)
RETURNING a.run_id
"""


class Watchdog:
    """The executor's side: starts the watchdog process and tells it about attempts."""

    def __init__(self, dsn: str | None = None, docker_url: str | None = None) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._groups: dict[str, str] = {}
        self._dsn, self._docker_url = dsn, docker_url
        self._disarmed: list[str] = []  #: not sent yet
        self._flush: asyncio.TimerHandle | None = None
        #: Messages waiting for room in the socket (the watchdog fell behind), with their fds.
        self._backlog: collections.deque[tuple[bytes, int | None]] = collections.deque()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                # This file as a script: the watchdog imports (almost) nothing but the standard library.
                sys.executable, "-I", os.path.abspath(__file__),
                stdin=theirs.fileno(), start_new_session=True,  # not paused or signalled with us
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        if self._dsn:
            self._send(f"db {self._dsn}")
        if self._docker_url:
            self._send(f"docker {self._docker_url}")

    def arm(self, key: str, pgid: int | None, deadline: float, *, container: str | None = None,
            run_id: str | None = None, attempt: int | None = None, node: str | None = None,
            status_fd: int | None = None) -> None:
        """Kill process group `pgid` (or `container`) once `time.monotonic()` passes `deadline`,
        unless extended. With the attempt's identity and bwrap's status pipe (or the container),
        an agent that ended before that gets its end written instead (the executor keeps its
        own copy of `status_fd`). Armed with the pipe before the spawn (`pgid` None), the
        watchdog learns the group from the pipe: an executor that dies right after the spawn
        leaves no agent unwatched. Arming again updates the attempt."""
        target = f"c:{container}" if container else str(pgid) if pgid else _UNKNOWN
        self._groups[key] = target
        who = f" {run_id} {attempt} {node}" if run_id and attempt and node else ""
        self._send(f"arm {key} {target} {deadline:.3f}{who}", status_fd)

    def extend(self, key: str, deadline: float) -> None:
        target = self._groups.get(key)
        if target is not None:
            self._send(f"arm {key} {target} {deadline:.3f}")

    def disarm(self, key: str) -> None:
        if self._groups.pop(key, None) is None:
            return
        self._disarmed.append(key)
        if len(self._disarmed) >= 256:
            self._send_disarms()
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(DISARM_WAIT_S, self._send_disarms)

    def _send_disarms(self) -> None:
        self._send("")

    def _send(self, line: str, fd: int | None = None) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._disarmed:
            line = "\n".join(filter(None, ("disarm " + " ".join(self._disarmed), line)))
            self._disarmed = []
        if not line or self._sock is None or self._proc is None or self._proc.returncode is not None:
            return
        data = line.encode()
        if not self._backlog:
            try:
                self._send_now(data, fd)
                return
            except BlockingIOError:  # the watchdog is behind: its socket is full
                asyncio.get_running_loop().add_writer(self._sock, self._drain)
            except OSError as err:
                log.warning("executor: the watchdog is gone (%r)", err)
                return
        # In order, never dropped: a lost extend would have a live agent killed at its old
        # deadline. The status pipe is duplicated: the executor may close its own meanwhile.
        self._backlog.append((data, os.dup(fd) if fd is not None else None))

    def _send_now(self, data: bytes, fd: int | None) -> None:
        assert self._sock is not None
        if fd is None:
            self._sock.send(data)
        else:
            socket.send_fds(self._sock, [data], [fd])

    def _drain(self) -> None:
        """What waited for room in the watchdog's socket, oldest first."""
        while self._backlog:
            data, fd = self._backlog[0]
            try:
                self._send_now(data, fd)
            except BlockingIOError:
                return
            except OSError as err:
                log.warning("executor: the watchdog is gone (%r)", err)
                self._drop_backlog()
                break
            self._backlog.popleft()
            if fd is not None:
                os.close(fd)
        if self._sock is not None:
            asyncio.get_running_loop().remove_writer(self._sock)

    def _drop_backlog(self) -> None:
        for _, fd in self._backlog:
            if fd is not None:
                os.close(fd)
        self._backlog.clear()

    async def close(self) -> None:
        if self._proc is None:
            return
        self._send_disarms()
        if self._sock is not None and self._backlog:
            self._sock.settimeout(2.0)  # the last messages, waited for: the watchdog is reading
            self._drain()  # what does not go within that is dropped, with a warning
        proc, self._proc = self._proc, None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


# -- the watchdog process ---------------------------------------------------------------------


@dataclass
class _Armed:
    target: str  #: a process group, or `c:` and a container id
    deadline: float
    run_id: str | None = None
    attempt: int | None = None
    node: str | None = None
    status: int | None = None  #: bwrap's status pipe, until it closes
    pending: bytes = b""
    exit_code: int | None = None
    ended: float = 0.0  #: monotonic


def _kill(target: str, why: str, docker: "_Docker | None" = None) -> None:
    if target == _UNKNOWN:  # its agent never started
        return
    if target.startswith("c:"):
        if docker is None or not docker.kill(target[2:]):
            return
        _say(f"killed agent container {target[2:12]}: {why}")
        return
    try:
        os.killpg(int(target), signal.SIGKILL)
    except ProcessLookupError:
        return
    _say(f"killed agent process group {target}: {why}")


class _Docker:
    """The few Engine API calls the watchdog needs, over its unix socket or TCP."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _request(self, method: str, path: str) -> tuple[int, bytes]:
        if self.url.startswith("unix://") or self.url.startswith("/"):
            conn: http.client.HTTPConnection = _UnixHTTP(self.url.removeprefix("unix://"))
        else:
            host = self.url.split("://", 1)[-1].rstrip("/")
            conn = http.client.HTTPConnection(host, timeout=3)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def exit_code(self, container: str) -> int | None:
        """The exit code of a container that exited by itself; None while it runs (or if the
        engine does not say)."""
        try:
            status, body = self._request("GET", f"/containers/{container}/json")
            state = json.loads(body).get("State", {}) if status == 200 else {}
        except (OSError, ValueError, http.client.HTTPException):
            return None
        code = state.get("ExitCode")
        if state.get("Status") != "exited" or state.get("OOMKilled") or not isinstance(code, int) or code >= 128:
            return None
        return code

    def kill(self, container: str) -> bool:
        try:
            status, _ = self._request("POST", f"/containers/{container}/kill?signal=KILL")
        except (OSError, http.client.HTTPException) as err:
            _say(f"cannot kill container {container[:10]}: {err!r}")
            return False
        return status == 204


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=3)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _say(text: str) -> None:
    print(f"kjob watchdog: {text}", file=sys.stderr, flush=True)


class _EndWriter:
    """Writes agents' ends to the ledger from a thread of its own, so that a database that is
    away never holds up a kill."""

    def __init__(self) -> None:
        self.dsn: str | None = None
        self._queue: queue.Queue[tuple[_Armed, float] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def open(self, dsn: str) -> None:
        """Connect now, while the database is there: an end to write during an outage then
        waits in line on a session that exists."""
        self.dsn = dsn
        if self._thread is None:
            self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
            self._thread.start()

    def write(self, attempt: _Armed) -> None:
        if self.dsn is None or attempt.run_id is None:
            _say(f"no database to write the end of {attempt.run_id}.{attempt.attempt} to")
            return
        self._queue.put((attempt, time.monotonic()))

    def finish(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(WRITE_FOR_S)

    async def _serve(self) -> None:
        """Writes the ends queued, oldest first, on one connection kept open: after an outage a
        write is one statement already in line, not a new session racing the takeover's claim.
        While the database is away, tried again every quarter of a second at most: a takeover
        waits longer than that after an outage (kjob.store.claims.TakeoverHeld)."""
        import asyncpg

        try:
            conn = await asyncpg.connect(self.dsn, timeout=5)
        except Exception:  # the database away at start: connected at the first end to write
            conn = None
        pending: list[tuple[_Armed, float]] = []
        closing = False
        delay = 0.05
        while pending or not closing:
            if not pending:
                item = await asyncio.to_thread(self._queue.get)
                if item is None:
                    break
                pending.append(item)
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                else:
                    pending.append(item)
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.dsn, timeout=5)
                while pending:
                    attempt, _ = pending[0]
                    # No statement deadline: one sent during a stall runs first thing after it.
                    written = await conn.fetchval(
                        _RECORD_END_SQL, attempt.run_id, attempt.attempt, attempt.node, attempt.exit_code,
                        max(0.0, time.monotonic() - attempt.ended), timeout=WRITE_FOR_S)
                    pending.pop(0)
                    _say(f"run {attempt.run_id} attempt {attempt.attempt}: its agent ended (exit code "
                         f"{attempt.exit_code}) while its executor could not record it; "
                         + ("written to the ledger" if written else "not written: the claim is no longer its"))
                delay = 0.05
            except Exception as err:  # whatever broke (asyncpg's own state errors after a dropped
                # session among them): a new session, and the end tried again; this thread never dies
                if conn is not None:
                    conn.terminate()
                    conn = None
                for item in [p for p in pending if time.monotonic() - p[1] > WRITE_FOR_S]:
                    _say(f"gave up writing the end of run {item[0].run_id}: {err!r}")
                    pending.remove(item)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)
        if conn is not None:
            conn.terminate()


def _read_status(attempt: _Armed) -> None:
    """bwrap's JSON lines so far, without waiting for more (the pipe is non-blocking);
    `exit-code` is the agent's end. EOF closes the pipe."""
    while attempt.status is not None:
        try:
            chunk = os.read(attempt.status, 4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            os.close(attempt.status)
            attempt.status = None
            return
        attempt.pending += chunk
        *lines, attempt.pending = attempt.pending.split(b"\n")
        for line in lines:
            _report(attempt, line)


def _report(attempt: _Armed, line: bytes) -> None:
    with contextlib.suppress(ValueError):
        report = json.loads(line)
        if not isinstance(report, dict):
            return
        if attempt.target == _UNKNOWN and isinstance(report.get("child-pid"), int):
            # Armed before the spawn (its executor may die right after it): the sandbox's
            # processes share the group of the launcher that started them.
            with contextlib.suppress(ProcessLookupError):
                attempt.target = str(os.getpgid(report["child-pid"]))
        code = report.get("exit-code")
        # 128 + n: killed by signal n (a timeout, the executor's own stop, the OOM killer):
        # not an end the agent reached, so not one that must stand for the attempt.
        if isinstance(code, int) and code < 128:
            attempt.exit_code, attempt.ended = code, time.monotonic()


def _ended(attempt: _Armed, docker: _Docker | None) -> bool:
    """Whether the attempt's agent ran to its end (a container is asked now)."""
    if attempt.exit_code is None and attempt.target.startswith("c:") and docker is not None:
        code = docker.exit_code(attempt.target[2:])
        if code is not None:
            attempt.exit_code, attempt.ended = code, time.monotonic()
    return attempt.exit_code is not None


def _conclude(key: str, attempt: _Armed, writer: _EndWriter, docker: _Docker | None, why: str) -> None:
    """The executor can no longer see to this attempt: write its agent's end, or kill it."""
    _read_status(attempt)  # what bwrap said while nobody listened
    if attempt.status is not None:
        os.close(attempt.status)
    if _ended(attempt, docker):
        writer.write(attempt)
        _kill(attempt.target, f"the rest of attempt {key}: {why}", docker)
    else:
        _kill(attempt.target, f"attempt {key}: {why}", docker)


def _command(words: list[str], armed: dict[str, _Armed], writer: _EndWriter, fds: list[int]) -> list[int]:
    """One line of a control message; the fds it did not take."""
    if len(words) == 2 and words[0] == "db":
        writer.open(words[1])
    elif len(words) in (4, 7) and words[0] == "arm":
        attempt = armed.setdefault(words[1], _Armed(target=_UNKNOWN, deadline=0.0))
        attempt.deadline = float(words[3])
        if words[2] != _UNKNOWN:
            attempt.target = words[2]
        if len(words) == 7:
            attempt.run_id, attempt.attempt, attempt.node = words[4], int(words[5]), words[6]
        if fds and attempt.status is None:
            attempt.status, fds = fds[0], fds[1:]
            # Shared with the executor's copy, which never reads it.
            os.set_blocking(attempt.status, False)
    elif len(words) >= 2 and words[0] == "disarm":
        for key in words[1:]:
            if (gone := armed.pop(key, None)) is not None and gone.status is not None:
                os.close(gone.status)
    return fds


def main() -> None:
    armed: dict[str, _Armed] = {}
    writer = _EndWriter()
    docker: _Docker | None = None
    #: None once the executor died: its agents then run on to their deadlines, as if it were
    #: paused (their claims hold till then), and an end reached meanwhile is written at once.
    control: socket.socket | None = socket.socket(fileno=sys.stdin.fileno())
    control.setblocking(False)
    while control is not None or armed:
        now = time.monotonic()
        for key, attempt in list(armed.items()):
            if now >= attempt.deadline or (control is None and attempt.exit_code is not None):
                del armed[key]
                why = "its executor died" if control is None else "its executor did not extend its deadline"
                _conclude(key, attempt, writer, docker, why)
        timeout = max(0.0, min((a.deadline for a in armed.values()), default=now + 60) - now)
        # bwrap's reports wait in their pipes while the executor lives: read when the attempt
        # is concluded (its deadline passed), or as they come once the executor died. Three
        # wakeups fewer per attempt.
        statuses = {} if control is not None else {a.status: a for a in armed.values() if a.status is not None}
        readable, _, _ = select.select([*statuses, *([control] if control else [])], [], [], timeout)
        for fd in readable:
            if fd in statuses:
                _read_status(statuses[fd])
        if control is None or control not in readable:
            continue
        for _ in range(1000):  # the messages waiting: a burst of arms costs one wakeup
            try:
                message, fds, _, _ = socket.recv_fds(control, 65536, 1)
            except BlockingIOError:
                break
            if not message:
                control.close()
                control = None
                break
            for words in (line.split() for line in message.decode(errors="replace").split("\n")):
                if len(words) == 2 and words[0] == "docker":
                    docker = _Docker(words[1])
                else:
                    fds = _command(words, armed, writer, fds)
            for fd in fds:
                os.close(fd)
    writer.finish()


if __name__ == "__main__":
    main()
