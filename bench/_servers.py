"""What the benchmarks share to run kjob as a user does: embedded nats-server and PostgreSQL,
`kjob server` processes per role group, an admin token, `kjob apply -f` of generated job files,
and the CPU each process spent (its own, not its children's: a sandbox's CPU is not kjob's).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kjob.embedded._process import free_port  # noqa: E402
from tests.support.nodes import KJOB, SchedulerProcess  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def own_cpu_s(pid: int) -> float:
    """utime + stime of `pid` alone, in seconds (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # stat fields 14 and 15


def reaped_cpu_s(pid: int) -> float:
    """cutime + cstime of `pid`: what its children that ended and were reaped spent."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def server_cpu_s(pid: int) -> float:
    """A server and its worker processes (PostgreSQL's backends): the live ones' own CPU plus
    what the ended ones left in the postmaster's reaped counters."""
    return own_cpu_s(pid) + reaped_cpu_s(pid) + sum(own_cpu_s(c) for c in children(pid))


@dataclass
class CpuMeter:
    """CPU seconds per named process between `start()` and `stop()`."""

    probes: dict[str, callable] = field(default_factory=dict)
    _at: dict[str, float] = field(default_factory=dict)
    spent: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, probe) -> None:
        self.probes[name] = probe

    def start(self) -> None:
        self._at = {name: probe() for name, probe in self.probes.items()}

    def stop(self) -> dict[str, float]:
        self.spent = {name: probe() - self._at[name] for name, probe in self.probes.items()}
        return self.spent


class KjobServers:
    """`kjob server` processes on one NATS and database, one per role group; the first group
    with `api` serves the API on a port of its own, reachable with `admin_token()`."""

    def __init__(self, base: Path, nats_url: str, db_url: str, groups: list[str], env: dict[str, str]) -> None:
        self.base, self.db_url = base, db_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        common = {"KJOB_NATS_URL": nats_url, "KJOB_DATABASE_URL": db_url, "KJOB_LOG_LEVEL": "WARNING",
                  "KJOB_EXECUTOR__SANDBOXES": '["process"]', **env}
        self.nodes = [SchedulerProcess(f"node-{i}-{roles.replace(',', '-')}", base,
                                       {**common, "KJOB_PORT": str(self.port)}, roles=roles)
                      for i, roles in enumerate(groups)]
        self.token = ""

    def start(self, timeout: float = 60.0) -> "KjobServers":
        for node in self.nodes:
            node.start()
        if any("api" in n.roles for n in self.nodes):
            deadline = time.monotonic() + timeout
            while True:
                for node in self.nodes:
                    assert node.proc.poll() is None, f"{node.name} exited: {node.logs()}"
                try:
                    if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"the API did not answer in {timeout:.0f}s"
                time.sleep(0.1)
        return self

    def admin_token(self) -> str:
        token_file = self.base / "admin.token"
        self.cli("db", "admin-token", "-f", str(token_file))
        self.token = token_file.read_text().strip()
        return self.token

    def cli(self, *args: str) -> str:
        """Run the `kjob` CLI against these servers, as a user would; its stdout."""
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("KJOB_")},
               "KJOB_HOME": str(self.base / "cli-home"), "KJOB_DATABASE_URL": self.db_url,
               "KJOB_API_URL": self.url, "KJOB_TOKEN": self.token}
        done = subprocess.run([KJOB, *args], env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"kjob {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def apply(self, toml_files: list[Path]) -> None:
        for path in toml_files:
            self.cli("apply", "-f", str(path), "-o", "json")

    def pids(self) -> dict[str, int]:
        return {n.roles: n.proc.pid for n in self.nodes if n.proc is not None}

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def job_files(base: Path, specs: list[dict], per_file: int) -> list[Path]:
    """`[[job]]` TOML files of at most `per_file` jobs each (the API's body limit). A spec is
    flat but for one level of tables (`sandbox = {...}`); strings are JSON-quoted, which TOML
    reads as its basic strings."""
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
