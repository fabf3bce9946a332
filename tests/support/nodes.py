"""Scheduler nodes as real processes (`kjob server`), to kill, pause and restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

KJOB = str(Path(sys.executable).with_name("kjob"))


class SchedulerProcess:
    """One `kjob server` process with its own name and env; restartable under the same name."""

    def __init__(self, name: str, base: Path, env: dict[str, str], roles: str = "ticker,executor,dispatcher") -> None:
        self.name, self.base, self.roles = name, base, roles
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KJOB_")},
            "KJOB_HOME": str(base / name),
            "KJOB_NODE_NAME": name,
            "KJOB_PORT": "0",
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.log_path = base / f"{name}.log"

    def start(self) -> "SchedulerProcess":
        (self.base / self.name).mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.started_at = time.time()  # when this node was last started, by our clock
        self.proc = subprocess.Popen([KJOB, "server", "--roles", self.roles], env=self.env, stdout=log, stderr=log)
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None

    def logs(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""
