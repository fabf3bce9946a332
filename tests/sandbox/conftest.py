"""Sandbox fixtures: the real backends, started as the executor starts them.

`backend` runs a test against every backend that claims the same contract: the process
backend in bubblewrap, the process backend without it, and docker (marked `docker`). The
docker engine and the test image are real; when the engine does not answer the tests fail
and say to run .ci/docker.sh, they never skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from kjob.executor.sandbox import DockerSandbox, Launch, ProcessSandbox, Sandbox
from kjob.model.job import SandboxSpec
from tests.support.images import IMAGE, ensure_test_images

DEADLINE_S = 10.0
#: The tenant of make_launch, allowed network "host" by the fixtures' sandboxes (as an operator
#: would in executor.host_network_tenants); other tenants are refused it.
HOST_NETWORK_TENANTS = ("acme",)


@dataclass
class Sink:
    """An OutputSink that records every chunk and can wait for a text to show up."""

    chunks: list[tuple[str, str]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, stream: str, text: str) -> None:
        self.chunks.append((stream, text))
        self._changed.set()

    def text(self, stream: str | None = None) -> str:
        return "".join(t for s, t in self.chunks if stream is None or s == stream)

    async def wait_for(self, needle: str, deadline_s: float = DEADLINE_S) -> None:
        async with asyncio.timeout(deadline_s):
            while needle not in self.text():
                self._changed.clear()
                await self._changed.wait()


@dataclass
class Backend:
    """One backend under test, with what a test needs to drive and inspect it."""

    id: str
    sandbox: Sandbox
    spec: SandboxSpec
    work_root: Path
    #: What of the attempt still exists after it ended: processes or containers, described.
    leftovers: Callable[[str, str], Awaitable[list[str]]]
    #: argv that connects to host:port and exits 0 only if the connection was made.
    connect: Callable[[str, int], list[str]]
    #: The agent's cwd and $HOME, as the agent sees it (None: a fresh dir under work_root).
    workdir: str | None = None

    def launch(self, argv: list[str], **changes: Any) -> Launch:
        return make_launch(argv, self.work_root, self.spec, **changes)


def make_launch(argv: list[str], work_root: Path, base_spec: SandboxSpec | None = None, **changes: Any) -> Launch:
    """A Launch with a fresh run id and test defaults; `spec={...}` changes fields of `base_spec`."""
    spec = (base_spec or SandboxSpec()).model_copy(update=changes.pop("spec", {}))
    base = Launch(
        run_id=str(uuid.uuid4()),
        tenant="acme",
        job_slug="nightly",
        attempt=1,
        argv=argv,
        stdin=None,
        env={},
        spec=spec,
        timeout=timedelta(seconds=10),
        output_cap_bytes=64 * 1024,
        work_root=work_root,
    )
    return replace(base, **changes)


def processes_with(marker: str) -> list[str]:
    """Live (non-zombie) host processes whose command line holds `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z" and int(pid) != os.getpid():
            found.append(f"pid {pid}: {cmdline.strip()}")
    return found


def host_ip() -> str:
    """This host's first non-loopback IPv4 address (the route a packet to the outside takes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: UDP connect only picks the route
        return s.getsockname()[0]


#: The system's interpreter: sandboxes see /usr, not the venv or a python under a home dir.
SYSTEM_PYTHON = "/usr/bin/python3"


def python_connect(host: str, port: int) -> list[str]:
    return [SYSTEM_PYTHON, "-c", f"import socket; socket.create_connection(({host!r}, {port}), 3)"]


def busybox_connect(host: str, port: int) -> list[str]:
    return ["sh", "-c", f"echo hello | nc -w 3 {host} {port}"]


async def dead_executor(backend: str, node: str, marker: str, work_root: Path) -> int:
    """Run an attempt in a separate executor process, and SIGKILL that process once the
    agent has started: what an executor that died mid-attempt leaves behind. Its pid."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.sandbox.executor_child", backend, node, marker, str(work_root),
        cwd=Path(__file__).parents[2], stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(DEADLINE_S):
            assert await proc.stdout.readline() == b"started\n"
    finally:
        proc.kill()
        await proc.wait()
    return proc.pid


async def eventually(check: Callable[[], Awaitable[bool]], deadline_s: float = DEADLINE_S) -> None:
    """Wait until `check()` is true; fail when `deadline_s` passes first."""
    async with asyncio.timeout(deadline_s):
        while not await check():
            await asyncio.sleep(0.02)


@pytest.fixture(scope="session")
def test_image() -> str:
    try:
        return ensure_test_images()
    except Exception as e:  # noqa: BLE001 - turned into the one message that says what to do
        pytest.fail(f"cannot build the test image ({e}); run .ci/docker.sh to install and start Docker")


@pytest.fixture(scope="session")
def node_name() -> str:
    """Unique per test session, so reaping never touches another session's containers."""
    return f"kjob-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
async def docker_sandbox(test_image: str, node_name: str) -> AsyncIterator[DockerSandbox]:
    sandbox = DockerSandbox(node_name, host_network_tenants=HOST_NETWORK_TENANTS)
    await sandbox.start()
    yield sandbox
    await sandbox.close()


@pytest.fixture(scope="session")
async def docker_api() -> AsyncIterator[aiodocker.Docker]:
    """A client of our own, to look at containers the way an operator would."""
    client = aiodocker.Docker(url=os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock")
    yield client
    await client.close()


async def containers_of_run(api: aiodocker.Docker, run_id: str) -> list[str]:
    found = await api.containers.list(all=True, filters=json.dumps({"label": [f"kjob.run={run_id}"]}))
    return [f"container {c.id[:12]}" for c in found]


@pytest.fixture(scope="session")
async def bwrap_sandbox() -> AsyncIterator[ProcessSandbox]:
    sandbox = ProcessSandbox(host_network_tenants=HOST_NETWORK_TENANTS)
    await sandbox.start()
    assert sandbox.isolated, f"bubblewrap does not work here: {sandbox.status()}; run .ci/docker.sh"
    yield sandbox
    await sandbox.close()


@pytest.fixture(scope="session")
async def bare_sandbox() -> AsyncIterator[ProcessSandbox]:
    sandbox = ProcessSandbox(use_bwrap=False, host_network_tenants=HOST_NETWORK_TENANTS)
    await sandbox.start()
    yield sandbox
    await sandbox.close()


@pytest.fixture(params=["process-bwrap", "process-bare", pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    async def no_processes(run_id: str, marker: str) -> list[str]:
        return processes_with(marker)

    if request.param == "docker":
        api = request.getfixturevalue("docker_api")

        async def no_containers(run_id: str, marker: str) -> list[str]:
            return await containers_of_run(api, run_id)

        return Backend(
            id="docker",
            sandbox=request.getfixturevalue("docker_sandbox"),
            spec=SandboxSpec(backend="docker", image=IMAGE),
            work_root=tmp_path,
            leftovers=no_containers,
            connect=busybox_connect,
            workdir="/work",
        )
    sandbox = request.getfixturevalue("bwrap_sandbox" if request.param == "process-bwrap" else "bare_sandbox")
    return Backend(
        id=request.param,
        sandbox=sandbox,
        spec=SandboxSpec(),
        work_root=tmp_path,
        leftovers=no_processes,
        connect=python_connect,
    )


@pytest.fixture
async def listener() -> AsyncIterator[tuple[str, int, list[bytes]]]:
    """A TCP server on the host's non-loopback address: (host, port, what each peer sent)."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(100))
        writer.close()

    host = host_ip()
    server = await asyncio.start_server(handle, host, 0)
    port = server.sockets[0].getsockname()[1]
    yield host, port, received
    server.close()
    await server.wait_closed()
