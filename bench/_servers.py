"""Shared pieces of the benchmarks: embedded nats-server and PostgreSQL, `kjob server`
processes (tests.support.nodes.SchedulerProcess) with their API URL, and a token.

    async with Servers("apply") as s:
        node = await s.node("api,ticker", "api-1")
        token = await s.token("bench")
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kjob.embedded import EmbeddedNats, EmbeddedPostgres  # noqa: E402
from kjob.embedded._process import _children  # noqa: E402
from kjob.store.database import create_engine, migrate  # noqa: E402
from kjob.store.tokens import TokenStore  # noqa: E402
from tests.support.nodes import SchedulerProcess  # noqa: E402

_API_AT = re.compile(r"API at (http://\S+)")


def rss_mb(pid: int) -> float:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_for(check, timeout: float, what: str, every: float = 0.05):
    """`await check()` until it is truthy; its value. TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s")


class Servers:
    """A temp dir, a nats-server, a PostgreSQL with a migrated database `name`, an engine, and
    the nodes started through `node()` (all stopped at exit)."""

    def __init__(self, name: str, *, pg_settings: dict[str, str] | None = None) -> None:
        self.name, self.pg_settings = name, pg_settings or {"max_connections": "200"}
        self.nodes: list[SchedulerProcess] = []

    async def __aenter__(self) -> "Servers":
        self._tmp = tempfile.TemporaryDirectory(prefix=f"kjob-{self.name}-")
        self.base = Path(self._tmp.name)
        os.chmod(self.base, 0o755)
        self.nats = EmbeddedNats(self.base / "nats").start()
        self.pg = EmbeddedPostgres(self.base / "pg", durable=False, settings=self.pg_settings).start()
        self.db_url = self.pg.ensure_database(self.name)
        self.engine = create_engine(self.db_url)
        await migrate(self.engine)
        return self

    async def __aexit__(self, *exc) -> None:
        for node in self.nodes:
            node.stop()
        await self.engine.dispose()
        self.nats.stop()
        self.pg.stop()
        self._tmp.cleanup()

    def env(self, **more: str) -> dict[str, str]:
        return {"KJOB_NATS_URL": self.nats.url, "KJOB_DATABASE_URL": self.db_url, "KJOB_LOG_LEVEL": "WARNING", **more}

    def process(self, roles: str, name: str, **env: str) -> SchedulerProcess:
        """A `kjob server` process, not started yet (stopped at exit)."""
        node = SchedulerProcess(name, self.base, self.env(**env), roles=roles)
        self.nodes.append(node)
        return node

    async def node(self, roles: str, name: str, timeout: float = 60, **env: str) -> SchedulerProcess:
        """A started `kjob server` process; with the api role, once it serves (`node.api_url`)."""
        node = self.process(roles, name, **env).start()
        node.api_url = None
        if "api" in roles.split(","):
            found = await wait_for(lambda: _API_AT.search(node.logs(100_000)), timeout, f"{name}'s API")
            node.api_url = found[1]
        return node

    async def token(self, tenant: str, role: str = "admin") -> str:
        _, secret = await TokenStore(self.engine).create(tenant, role, "bench")
        return secret


# -- CPU per process, and job files for `kjob apply` (bench/fastpath.py) ----------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def server_cpu_s(pid: int) -> float:
    """A server and its worker processes (PostgreSQL's backends): the live ones' own CPU, plus
    what the ended ones left in the server's counters of reaped children (stat fields 16, 17)."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    reaped = (int(fields[13]) + int(fields[14])) / CLOCK_TICKS
    return cpu_s(pid) + reaped + sum(own_cpu_s(c) for c in _children(pid))


def own_cpu_s(pid: int) -> float:
    """`cpu_s`, 0 once the process is gone."""
    return cpu_s(pid) if _stat(pid) is not None else 0.0


def kjob_cpu_s(pid: int) -> float:
    """A `kjob server` process and the kjob processes it started (`executor.processes`), each
    its own CPU only: the sandboxes below them are not counted (their CPU is the agents')."""
    total = own_cpu_s(pid)
    for child in _children(pid):
        try:
            comm = Path(f"/proc/{child}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith(("kjob", "python")):
            total += kjob_cpu_s(child)
    return total


def watchdog_pids(pid: int) -> list[int]:
    """The executor watchdogs (kjob/executor/watchdog.py) below a `kjob server` process."""
    found = []
    for child in _children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"kjob/executor/watchdog.py" in cmdline:
            found.append(child)
        elif b"kjob" in cmdline or b"python" in cmdline:
            found += watchdog_pids(child)
    return found


class CpuMeter:
    """CPU seconds of each named probe between `start()` and `stop()`."""

    def __init__(self) -> None:
        self.probes: dict = {}
        self._at: dict[str, float] = {}

    def add(self, name: str, probe) -> None:
        self.probes[name] = probe

    def start(self) -> None:
        self._at = {name: probe() for name, probe in self.probes.items()}

    def stop(self) -> dict[str, float]:
        return {name: probe() - self._at[name] for name, probe in self.probes.items()}


def job_files(base: Path, specs: list[dict], per_file: int) -> list[Path]:
    """`[[job]]` TOML files of at most `per_file` jobs each. A spec is flat but for one level
    of tables (`sandbox = {...}`); strings are JSON-quoted, which TOML reads as basic strings."""
    import json

    def value(v) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    base.mkdir(parents=True, exist_ok=True)
    files = []
    for start in range(0, len(specs), per_file):
        path = base / f"jobs-{start // per_file:04d}.toml"
        path.write_text("".join("[[job]]\n" + "".join(f"{k} = {value(v)}\n" for k, v in spec.items()) + "\n"
                                for spec in specs[start:start + per_file]))
        files.append(path)
    return files


def kjob_cli(*args: str, api_url: str, token: str, home: Path) -> str:
    """The `kjob` CLI against a running API, as a user runs it; its stdout."""
    import subprocess

    from tests.support.nodes import KJOB

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KJOB_")},
           "KJOB_HOME": str(home), "KJOB_API_URL": api_url, "KJOB_TOKEN": token}
    done = subprocess.run([KJOB, *args], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"kjob {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout
