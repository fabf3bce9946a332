"""A dead man's switch for agents: a small process of its own that kills an attempt's agent
when its executor stops extending the attempt's deadline.

The executor stops an agent itself before the agent's claim can lapse (ClaimKeeper). That
needs the executor to run: an executor that is paused (SIGSTOP, a debugger, a frozen cgroup)
stops nothing, its agents go on, the claim lapses and another executor runs the attempt again
beside them. The watchdog is a separate process, in a session of its own, so a pause of the
executor does not pause it: each attempt is armed with its process group and a deadline on
the host's monotonic clock (shared by every process of the host), the executor extends the
deadline at every renewal of the claim, and a deadline that passes kills the group.

Protocol on the watchdog's stdin, one line each: `arm KEY PGID DEADLINE`, `disarm KEY`.
End of input (the executor died) kills every armed group: its agents must not outlive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import sys
import time

log = logging.getLogger(__name__)


class Watchdog:
    """The executor's side: starts the watchdog process and tells it about attempts."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._groups: dict[str, int] = {}

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            # This file as a script: the watchdog imports nothing but the standard library.
            sys.executable, "-I", os.path.abspath(__file__),
            stdin=asyncio.subprocess.PIPE, start_new_session=True,  # not paused or signalled with us
        )

    def arm(self, key: str, pgid: int, deadline: float) -> None:
        """Kill process group `pgid` once `time.monotonic()` passes `deadline`, unless extended."""
        self._groups[key] = pgid
        self._send(f"arm {key} {pgid} {deadline:.3f}")

    def extend(self, key: str, deadline: float) -> None:
        pgid = self._groups.get(key)
        if pgid is not None:
            self._send(f"arm {key} {pgid} {deadline:.3f}")

    def disarm(self, key: str) -> None:
        if self._groups.pop(key, None) is not None:
            self._send(f"disarm {key}")

    def _send(self, line: str) -> None:
        if self._proc is None or self._proc.stdin is None or self._proc.returncode is not None:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            self._proc.stdin.write(line.encode() + b"\n")

    async def close(self) -> None:
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        with contextlib.suppress(ConnectionError, RuntimeError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _kill(pgid: int, why: str) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    print(f"kjob watchdog: killed agent process group {pgid}: {why}", file=sys.stderr, flush=True)


def main() -> None:
    armed: dict[str, tuple[int, float]] = {}
    pending = b""
    fd = sys.stdin.fileno()
    while True:
        now = time.monotonic()
        for key, (pgid, deadline) in list(armed.items()):
            if now >= deadline:
                del armed[key]
                _kill(pgid, f"its executor did not extend attempt {key}'s deadline")
        timeout = max(0.0, min((d for _, d in armed.values()), default=now + 60) - now)
        readable, _, _ = select.select([fd], [], [], timeout)
        if not readable:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            for key, (pgid, _) in armed.items():
                _kill(pgid, f"its executor ended while attempt {key} ran")
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            words = line.decode(errors="replace").split()
            if len(words) == 4 and words[0] == "arm":
                armed[words[1]] = (int(words[2]), float(words[3]))
            elif len(words) == 2 and words[0] == "disarm":
                armed.pop(words[1], None)


if __name__ == "__main__":
    main()
