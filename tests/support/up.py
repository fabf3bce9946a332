"""`kjob up` as a real process for client tests: the console script on a free port, its own
embedded NATS, and the database the test gives it (`KJOB_DATABASE_URL`), stopped with SIGTERM.

    with KjobUp(home, database_url) as up:
        Client(up.url, up.token)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
