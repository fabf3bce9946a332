"""`kjob up` as a user runs it: a real process on embedded NATS and PostgreSQL, stopped with
SIGTERM and started again on the same home."""

from __future__ import annotations

import asyncio
import socket
from datetime import datetime, timedelta

import nats

from kjob.cli import serve
from kjob.config import Settings
from kjob.embedded import _process

from tests.support.pipeline import until
from tests.support.up import Up, processes_using


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
    # no hole: every second from the first slot to the last (two of one slot the index forbids)
    assert all((b - a) == timedelta(seconds=1) for a, b in zip(slots, slots[1:])), slots
    # the downtime: the latest missed slot ran (catch-up), the others are recorded as missed.
    # The downtime ends at the first slot the restarted node ran on schedule. (On a loaded
    # machine its lease may lapse once later on: that gap is a catch-up of its own, seen: two.)
    resumed = min(datetime.fromisoformat(r["slot"]) for r in history if r["trigger"] == "schedule"
                  and r["status"] == "succeeded" and datetime.fromisoformat(r["slot"]) > stopped_at + timedelta(seconds=4))
    downtime = [r for r in history if (r["status"] == "missed" or r["trigger"] == "catchup")
                and datetime.fromisoformat(r["slot"]) < resumed]
    assert len([r for r in downtime if r["trigger"] == "catchup"]) == 1, downtime
    # The slots the stopped ticker had queued ahead (its look-ahead) are the downtime's like
    # any other: settled by the catch-up rule, not run late nor left waiting beside it.
    # A slot of the restarted node's own may be skipped while the catch-up run still runs
    # (overlap `skip`): neither late nor waiting (seen on a loaded machine).
    ahead = [r for r in history if stopped_at < datetime.fromisoformat(r["slot"]) < resumed
             and r["status"] != "missed" and r["trigger"] != "catchup"
             and not (r["status"] == "skipped" and r.get("reason_code") == "overlap")]
    assert ahead == [], [(r["slot"], r["trigger"], r["status"], r.get("reason_code"), r.get("started_at"))
                         for r in ahead]
    missed = [r for r in downtime if r["status"] == "missed"]
    assert len(missed) >= 2 and all("scheduler was down" in r["reason"] for r in missed)
    catchup = next(r for r in downtime if r["trigger"] == "catchup")
    assert catchup["slot"] > max(r["slot"] for r in missed)


async def test_the_embedded_nats_moves_when_its_port_is_taken_as_it_starts(tmp_path, monkeypatch):
    """Two `kjob up` starting at once may both find a port free and both bind it: the one
    that loses starts on another port instead of failing (seen: a clean-clone CI run)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    settings = Settings(home=tmp_path / "home")
    settings.home.mkdir()
    (settings.home / "nats.port").write_text(str(taken))
    monkeypatch.setattr(_process, "port_is_free", lambda port, host="127.0.0.1": True)  # the check passed before the bind
    try:
        async with serve._nats(settings) as urls:
            url = next(iter(urls.values()))
            assert f":{taken}" not in url
            nc = await nats.connect(url)
            await nc.close()
            assert (settings.home / "nats.port").read_text() != str(taken)
    finally:
        holder.close()
