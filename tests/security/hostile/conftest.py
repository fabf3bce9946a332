"""A real node under attack: `kjob up` (embedded NATS and PostgreSQL, every role, the process
and docker backends, the executor as the test's user: root in CI), tenant `acme` with a
secret, jobs and a run streaming output while the tests run, and tenant `beta`, whose
ordinary editor token submits the hostile jobs through the API.

Every attack is judged from outside the product: what the job printed, what appeared on the
host, what the node's own processes listen on, and `Leaks.assert_none_in`, which knows every
secret of the node and of acme (admin token, secret key, acme's token, secret value, prompt
and live output, a canary in the executor's environment).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.images import IMAGE, ensure_test_images

KJOB = str(Path(sys.executable).with_name("kjob"))
READY_S = 60.0
RUN_DEADLINE_S = 40.0
#: The size of each sandbox's work dir and /tmp on the node: small, so a disk filler ends soon.
SANDBOX_DISK = "32m"
FINISHED = {"succeeded", "failed", "timed_out", "error", "lost", "missed", "skipped", "cancelled"}
#: The system interpreter, which process sandboxes see (the venv's may live under a home dir).
PY = "/usr/bin/python3"
DOCKER = {"backend": "docker", "image": IMAGE}


@dataclass
class Node:
    home: Path
    proc: subprocess.Popen[bytes]
    url: str
    admin: httpx.Client
    #: put in kjob up's environment: must never be seen by an agent
    canary: str
    log: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def tree(self) -> list[int]:
        """kjob up and every process it started (nats-server, postgres, its agents...)."""
        children: dict[int, list[int]] = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(pid))
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    def listeners(self) -> tuple[list[tuple[str, int]], list[str]]:
        """(TCP (address, port), unix socket paths) the node's own processes listen on, read
        from /proc: the API, NATS and PostgreSQL, whatever the product says about itself."""
        inodes: set[str] = set()
        for pid in self.tree():
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
            except OSError:
                continue
        tcp = []
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                hex_ip, hex_port = cols[1].split(":")
                ip = ".".join(str(int(hex_ip[i:i + 2], 16)) for i in (6, 4, 2, 0))
                tcp.append((ip, int(hex_port, 16)))
        unix = [cols[7] for cols in (line.split() for line in Path("/proc/net/unix").read_text().splitlines()[1:])
                if len(cols) >= 8 and cols[6] in inodes and cols[5] == "01"]
        return tcp, unix


@dataclass
class Tenant:
    name: str
    token: str
    client: httpx.Client

    def run(self, prompt: str, *, sandbox: dict[str, Any] | None = None, timeout: str = "20s",
            deadline_s: float = RUN_DEADLINE_S) -> "Attack":
        """Create a job (agent `shell`), run it now, wait until its run ends; its output."""
        slug = f"h-{uuid.uuid4().hex[:10]}"
        created = self.create(slug, prompt, sandbox=sandbox, timeout=timeout)
        assert created.status_code == 201, created.text
        return self.run_now(slug, deadline_s)

    def create(self, slug: str, prompt: str, *, sandbox: dict[str, Any] | None = None, timeout: str = "20s",
               schedule: str = "0 0 1 1 *") -> httpx.Response:
        body: dict[str, Any] = {"slug": slug, "prompt": prompt, "agent": "shell", "schedule": schedule,
                                "timeout": timeout, "output": {"channel": "none"}}
        if sandbox is not None:
            body["sandbox"] = sandbox
        return self.client.post("/v1/jobs", json=body)

    def run_now(self, slug: str, deadline_s: float = RUN_DEADLINE_S) -> "Attack":
        started = self.client.post(f"/v1/jobs/{slug}/run")
        assert started.status_code == 202, started.text
        run_id = started.json()["id"]
        deadline = time.monotonic() + deadline_s
        while True:
            run = self.client.get(f"/v1/runs/{run_id}").json()
            if run["status"] in FINISHED:
                break
            assert time.monotonic() < deadline, f"run {run_id} of {slug} did not finish in {deadline_s}s: {run}"
            time.sleep(0.1)
        logs = self.client.get(f"/v1/runs/{run_id}/logs")
        return Attack(run=run, output=logs.text if logs.status_code == 200 else run.get("output_excerpt") or "")


@dataclass
class Attack:
    run: dict[str, Any]
    output: str

    def lines(self) -> list[str]:
        return self.output.splitlines()


@dataclass
class Leaks:
    """Everything a hostile job of beta must never see."""

    node: Node
    values: dict[str, str] = field(default_factory=dict)

    def assert_none_in(self, text: str) -> None:
        for what, value in self.values.items():
            assert value not in text, f"{what} leaked to the attacker: {text[:2000]}"


@dataclass
class Acme:
    tenant: Tenant
    secret: str
    prompt_marker: str
    output_marker: str
    live_run_id: str
    #: the host path of acme's live run's work dir (`<home>/work/<run>-<attempt>`)
    live_workdir: Path


def _start(home: Path, canary: str) -> Node:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KJOB_")}
    env.update(
        KJOB_HOME=str(home),
        KJOB_NODE_NAME=f"hostile-{uuid.uuid4().hex[:8]}",  # docker reaping is per node name
        KJOB_EXECUTOR__SANDBOXES='["process", "docker"]',
        KJOB_EXECUTOR__SANDBOX_DISK=SANDBOX_DISK,
        KJOB_EXECUTOR__CONCURRENCY="6",
        KJOB_CANARY=canary,
    )
    log = home.parent / "up.log"
    proc = subprocess.Popen([KJOB, "up", "--port", "0"], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + READY_S
    url_file = home / "api.url"
    while not (url_file.exists() and url_file.read_text().strip()):
        assert proc.poll() is None, f"kjob up exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"kjob up not ready in {READY_S}s: {log.read_text()[-3000:]}"
        time.sleep(0.1)
    url = url_file.read_text().strip()
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {(home / 'admin.token').read_text().strip()}"},
                         timeout=20)
    return Node(home=home, proc=proc, url=url, admin=admin, canary=canary, log=log)


def _tenant(node: Node, name: str) -> Tenant:
    made = node.admin.post("/v1/tokens", json={"role": "editor", "tenant": name, "name": f"{name} editor"})
    assert made.status_code == 201, made.text
    token = made.json()["secret"]
    return Tenant(name, token, httpx.Client(base_url=node.url, headers={"Authorization": f"Bearer {token}"}, timeout=20))


@pytest.fixture(scope="package")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    ensure_test_images()
    home = tmp_path_factory.mktemp("hostile") / "home"
    home.mkdir()
    up = _start(home, canary=f"canary-{secrets.token_hex(8)}")
    try:
        yield up
    finally:
        up.admin.close()
        up.proc.send_signal(signal.SIGTERM)
        try:
            up.proc.wait(30)
        except subprocess.TimeoutExpired:
            up.proc.kill()


@pytest.fixture(scope="package")
def acme(node: Node) -> Iterator[Acme]:
    """Acme's secret, and a run of acme that prints its prompt marker and streams output for as
    long as the hostile tests run (its timeout ends it after the suite)."""
    tenant = _tenant(node, "acme")
    secret = f"acme-secret-{secrets.token_hex(8)}"
    assert tenant.client.put("/v1/secrets/model-key", json={"value": secret}).status_code == 201
    prompt_marker, output_marker = f"acme-prompt-{secrets.token_hex(6)}", f"acme-out-{secrets.token_hex(6)}"
    prompt = (f": {prompt_marker}; echo $MODEL_KEY > key; while true; do echo {output_marker}; "
              "cat key > /dev/null; sleep 0.2; done")
    created = tenant.client.post("/v1/jobs", json={
        "slug": "acme-live", "prompt": prompt, "agent": "shell", "schedule": "0 0 1 1 *", "timeout": "10m",
        "output": {"channel": "none"}, "sandbox": {"env": {"MODEL_KEY": "secret:model-key"}},
    })
    assert created.status_code == 201, created.text
    run_id = tenant.client.post("/v1/jobs/acme-live/run").json()["id"]
    seen = ""
    with tenant.client.stream("GET", f"/v1/runs/{run_id}/logs", params={"follow": "true"},
                              timeout=RUN_DEADLINE_S) as live_logs:
        for chunk in live_logs.iter_text():
            seen += chunk
            if output_marker in seen:
                break
    assert output_marker in seen, f"acme's live run never printed: {seen} {node.logs()}"
    run = tenant.client.get(f"/v1/runs/{run_id}").json()
    live = Acme(tenant, secret, prompt_marker, output_marker, run_id, node.home / "work" / f"{run_id}-{run['attempt']}")
    yield live
    tenant.client.post("/v1/jobs/acme-live/disable")
    tenant.client.close()


@pytest.fixture(scope="package")
def beta(node: Node) -> Iterator[Tenant]:
    tenant = _tenant(node, "beta")
    yield tenant
    tenant.client.close()


@pytest.fixture(scope="package")
def leaks(node: Node, acme: Acme) -> Leaks:
    home = node.home
    return Leaks(node, {
        "the admin token": (home / "admin.token").read_text().strip(),
        "the secret key": (home / "secret.key").read_text().strip(),
        "acme's token": acme.tenant.token,
        "acme's secret": acme.secret,
        "acme's prompt": acme.prompt_marker,
        "acme's output": acme.output_marker,
        "the executor's environment": node.canary,
    })


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The job's `sandbox` table for each backend an attack applies to."""
    return {} if request.param == "process" else dict(DOCKER)


@dataclass
class Outside:
    """A stand-in for a host on the internet: a network namespace behind a veth pair, in
    198.51.100.0/30 (TEST-NET-2, not a private range), with a TCP server that records what
    each peer sent. It is not this host: its address is not one of the node's."""

    address: str
    port: int
    received: Path


@pytest.fixture(scope="package")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outside]:
    tag = secrets.token_hex(3)
    ns, veth, peer = f"kjob-out-{tag}", f"kjo{tag}", f"kjp{tag}"
    # Another test session may hold a 198.51.100.x/30 of its own: pick a free /30.
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    base = next(n for n in range(0, 256, 4) if f"198.51.100.{n + 1}/" not in used)
    host_ip, out_ip = f"198.51.100.{base + 1}", f"198.51.100.{base + 2}"
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", veth, "type", "veth", "peer", "name", peer],
        ["ip", "link", "set", peer, "netns", ns],
        ["ip", "addr", "add", f"{host_ip}/30", "dev", veth],
        ["ip", "link", "set", veth, "up"],
        ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{out_ip}/30", "dev", peer],
        ["ip", "netns", "exec", ns, "ip", "link", "set", peer, "up"],
        ["ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", host_ip],
    ]
    received = tmp_path_factory.mktemp("outside") / "received"
    server = None
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        script = (
            "import socket, sys\n"
            f"s = socket.socket(); s.bind(({out_ip!r}, 8080)); s.listen()\n"
            "print('ready', flush=True)\n"
            "while True:\n"
            "    c, _ = s.accept(); c.settimeout(3)\n"
            f"    data = c.recv(200); open({str(received)!r}, 'ab').write(data + b'\\n'); c.close()\n"
        )
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        yield Outside(out_ip, 8080, received)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
