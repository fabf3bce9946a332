"""`kjob up` as a real process: the console script on a free port, on a home of the test's,
stopped with SIGTERM.

- `KjobUp(home, database_url)`: for client tests, its own embedded NATS and the database the
  test gives it (`KJOB_DATABASE_URL`), as a context manager:

      with KjobUp(home, database_url) as up:
          Client(up.url, up.token)

- `Up(home).start()`: everything embedded, as a user runs it, with an httpx client holding the
  admin token; start it again on the same home to test a restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

KJOB = str(Path(sys.executable).with_name("kjob"))
START_DEADLINE_S = 60.0


class KjobUp:
    def __init__(self, home: Path, database_url: str, **env: str) -> None:
        self.home = home
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KJOB_")},
            "KJOB_HOME": str(home),
            "KJOB_DATABASE_URL": database_url,
            "KJOB_EXECUTOR__SANDBOXES": '["process"]',
            **env,
        }
        self.log_path = home.parent / f"{home.name}-up.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.token = ""

    def __enter__(self) -> KjobUp:
        self.home.mkdir(parents=True, exist_ok=True)
        url_file = self.home / "api.url"
        url_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([KJOB, "up", "--port", "0"], env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + START_DEADLINE_S
        while not (url_file.exists() and url_file.read_text().strip()):
            assert self.proc.poll() is None, f"kjob up exited: {self.logs()}"
            assert time.monotonic() < deadline, f"kjob up not ready in {START_DEADLINE_S:.0f}s: {self.logs()}"
            time.sleep(0.05)
        self.url = url_file.read_text().strip()
        self.token = (self.home / "admin.token").read_text().strip()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        assert code == 0, f"kjob up exited {code}: {self.logs()}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""


class Up:
    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.env = env or {}  # more KJOB_* settings for this process
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Up":
        env = {k: v for k, v in os.environ.items() if not k.startswith("KJOB_")}
        # No late grace: a downtime goes through the catch-up rule (tests/pipeline/test_up.py).
        env.update(KJOB_HOME=str(self.home), KJOB_EXECUTOR__SANDBOXES='["process"]', KJOB_TICKER__LATE_GRACE_S="0")
        env.update(self.env)
        (self.home / "api.url").unlink(missing_ok=True)
        self.log = open(self.home.parent / f"{self.home.name}-up.log", "ab")
        self.proc = subprocess.Popen([KJOB, "up", "--port", "0"], env=env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while not (self.home / "api.url").exists() or not (self.home / "api.url").read_text():
            assert self.proc.poll() is None, f"kjob up exited: {self.logs()}"
            assert time.monotonic() < deadline, f"kjob up not ready in 60s: {self.logs()}"
            time.sleep(0.1)
        self.client = httpx.Client(base_url=(self.home / "api.url").read_text().strip(),
                                   headers={"Authorization": f"Bearer {(self.home / 'admin.token').read_text().strip()}"})
        return self

    def stop(self) -> int:
        assert self.proc is not None
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def logs(self) -> str:
        return (self.home.parent / f"{self.home.name}-up.log").read_text(errors="replace")[-3000:]


def processes_using(path: Path) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmd and "pytest" not in cmd:
            found.append(f"{pid}: {cmd}")
    return found
