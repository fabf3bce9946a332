"""`kjob up` as a user runs it: a real process on embedded NATS and PostgreSQL, stopped with
SIGTERM and started again on the same home."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx

from tests.support.pipeline import until

KJOB = str(Path(sys.executable).with_name("kjob"))


class Up:
    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.env = env or {}  # more KJOB_* settings for this process
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Up":
        env = {k: v for k, v in os.environ.items() if not k.startswith("KJOB_")}
        # No late grace: the 4 s downtime below must go through the catch-up rule.
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


def runs(up: Up, slug: str) -> list[dict]:
    return sorted(up.client.get(f"/v1/jobs/{slug}/runs", params={"limit": 1000}).json(), key=lambda r: r["slot"])


async def test_up_restart_keeps_jobs_and_settles_downtime_without_duplicates(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    up = Up(home).start()
    try:
        created = up.client.post("/v1/jobs", json={"slug": "beat", "prompt": "echo beat", "agent": "shell",
                                                   "schedule": "@every 1s", "catchup": {"window": "1h", "policy": "latest"}})
        assert created.status_code == 201, created.text
        await until(lambda: asyncio.to_thread(lambda: len([r for r in runs(up, "beat") if r["status"] == "succeeded"]) >= 3),
                    20, "3 runs before the restart")
    finally:
        assert up.stop() == 0, up.logs()
    assert processes_using(home) == []  # no orphaned nats-server or postgres

    stopped_at = datetime.now().astimezone()
    await asyncio.sleep(4)  # the downtime under test: slots fall due while nothing runs

    up = Up(home).start()
    try:
        assert [j["slug"] for j in up.client.get("/v1/jobs").json()] == ["beat"]  # the job survived

        def after_restart():
            return len([r for r in runs(up, "beat") if r["trigger"] == "schedule" and r["status"] == "succeeded"
                        and datetime.fromisoformat(r["slot"]) > stopped_at + timedelta(seconds=4)]) >= 2
        await until(lambda: asyncio.to_thread(after_restart), 30, "scheduled runs after the restart")
        history = runs(up, "beat")
    finally:
        assert up.stop() == 0, up.logs()
    assert processes_using(home) == []

    slots = [datetime.fromisoformat(r["slot"]) for r in history]
    # every second from the first slot to the last is in the ledger exactly once
    assert len(slots) == len(set(slots))
    assert all((b - a) == timedelta(seconds=1) for a, b in zip(slots, slots[1:])), slots
    # the downtime: the latest missed slot ran (catch-up), the others are recorded as missed
    downtime = [r for r in history if r["status"] == "missed" or r["trigger"] == "catchup"]
    assert len([r for r in downtime if r["trigger"] == "catchup"]) == 1
    missed = [r for r in downtime if r["status"] == "missed"]
    assert len(missed) >= 2 and all("scheduler was down" in r["reason"] for r in missed)
    catchup = next(r for r in downtime if r["trigger"] == "catchup")
    assert catchup["slot"] > max(r["slot"] for r in missed)
