"""The docker backend: each attempt runs in a fresh, hardened container, removed at the end.

Hardened by default: no network (`none`), all capabilities dropped, no-new-privileges, a
read-only root filesystem with tmpfs at the work dir and /tmp, a pids limit, and a non-root
user (the image's `USER`, else its first regular user, else nobody). Every container carries
the labels `kjob.tenant`, `kjob.job`, `kjob.run` and `kjob.node`; start() removes containers
of this node that a dead executor left behind. See docs/sandboxes.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
from typing import Any

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError

from kjob.errors import InvalidInput, ServerError
from kjob.executor.sandbox.base import Launch, Outcome, OutputSink, Sandbox
from kjob.executor.sandbox.exits import exit_reason
from kjob.executor.sandbox.output import OutputCollector
from kjob.model.durations import format_duration
from kjob.model.sizes import parse_size

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
DEFAULT_WORKDIR = "/work"
DEFAULT_PIDS = 256
#: The work dir and /tmp are tmpfs (RAM, charged to the container's memory limit); capped so a
#: container without a memory limit cannot fill the node's RAM through them.
TMPFS_OPTIONS = "rw,exec,nosuid,nodev,size=1g,mode=1777"
#: docker stop's grace between SIGTERM and SIGKILL at a timeout or cancellation.
KILL_GRACE_S = 2
#: After the container exits, how long its attach stream may take to deliver the last output.
DRAIN_S = 2.0
#: How long the engine may take to answer at start().
PING_TIMEOUT_S = 10.0
#: Used when an image has no USER and no regular user in /etc/passwd.
NOBODY = "65534:65534"
#: Network modes that would hand the agent the node's network or another container's.
_SHARED_NETWORKS = re.compile(r"^(host|container:.*)$")
#: What docker-init (tini) prints when the agent's program does not exist in the image.
_TINI_EXEC_FAILED = re.compile(r"^\[FATAL tini \(\d+\)\] (exec .* failed: .*)$", re.MULTILINE)

LABEL_TENANT, LABEL_JOB, LABEL_RUN, LABEL_NODE = "kjob.tenant", "kjob.job", "kjob.run", "kjob.node"
LABEL_ATTEMPT = "kjob.attempt"


class _StartError(Exception):
    """The attempt cannot start; the message becomes Outcome.start_error."""


class DockerSandbox(Sandbox):
    """Runs agents in containers on one Docker engine.

    `node_name` labels every container, and start() reaps containers with this node's label:
    it must be unique per executor process on one engine. `docker_url` falls back to
    `$DOCKER_HOST`, then the local socket.
    """

    name = "docker"

    def __init__(self, node_name: str, docker_url: str | None = None) -> None:
        self.node_name = node_name
        self.url = docker_url or os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
        self._docker: aiodocker.Docker | None = None
        self._engine = "not started"
        #: image id -> the user its containers run as (resolving it may need a probe container)
        self._users: dict[str, str] = {}

    async def start(self) -> None:
        """Check the engine answers, then remove containers a dead executor of this node left.

        :raises ServerError: the engine at `url` does not answer.
        """
        try:
            self._docker = aiodocker.Docker(url=self.url)
            async with asyncio.timeout(PING_TIMEOUT_S):
                version = await self._docker.version()
        except (DockerError, aiohttp.ClientError, OSError, ValueError, TimeoutError) as e:
            await self.close()
            raise ServerError(
                f"the Docker engine at {self.url} does not answer ({e or type(e).__name__}); start it "
                "(systemctl start docker, or dockerd &), or point executor.docker_url / DOCKER_HOST at one, "
                "or remove 'docker' from executor.sandboxes"
            ) from e
        self._engine = f"Docker {version.get('Version', '?')} at {self.url}"
        reaped = await self.reap()
        if reaped:
            log.warning("docker sandbox: removed %d container(s) left by a previous executor on node %s",
                        reaped, self.node_name)

    async def reap(self) -> int:
        """Remove every container labelled with this node; return how many. Only safe while
        this executor has no attempt running (start() calls it first thing)."""
        docker = self._require()
        filters = json.dumps({"label": [f"{LABEL_NODE}={self.node_name}"]})
        leftovers = await docker.containers.list(all=True, filters=filters)
        for container in leftovers:
            await _remove(container, grace_s=0)
        return len(leftovers)

    async def close(self) -> None:
        if self._docker is not None:
            docker, self._docker = self._docker, None
            await docker.close()

    def status(self) -> dict[str, str]:
        return {"engine": self._engine}

    def _require(self) -> aiodocker.Docker:
        if self._docker is None:
            raise RuntimeError("DockerSandbox used before start()")
        return self._docker

    async def run(self, launch: Launch, on_output: OutputSink) -> Outcome:
        docker = self._require()
        try:
            async with asyncio.timeout(launch.timeout.total_seconds()):
                image = await self._image(docker, launch)
            config = self._config(launch, await self._user(docker, image))
        except _StartError as e:
            return Outcome(start_error=str(e))
        except TimeoutError:
            return Outcome(start_error=f"pulling image {launch.spec.image!r} on {self.url} took longer "
                                       f"than the {format_duration(launch.timeout)} timeout")
        name = _container_name(launch)
        try:
            container = await docker.containers.create(config, name=name)
        except DockerError as e:
            return Outcome(start_error=f"docker at {self.url} could not create the container: {e.message}")
        try:
            return await self._attempt(container, launch, on_output)
        finally:
            # Also on timeout and cancellation: the container never outlives its attempt.
            await asyncio.shield(_remove(container, grace_s=KILL_GRACE_S))

    async def _attempt(self, container: DockerContainer, launch: Launch, on_output: OutputSink) -> Outcome:
        collector = OutputCollector(launch.output_cap_bytes, on_output, launch.run_id)
        async with contextlib.AsyncExitStack() as stack:
            # Attach before start, so not a byte of output is missed. stdin gets its own
            # attach: closing it is how the agent sees end-of-file (StdinOnce).
            out = await stack.enter_async_context(container.attach(stdout=True, stderr=True))
            stdin = None
            if launch.stdin is not None:
                stdin = await stack.enter_async_context(container.attach(stdin=True))
            try:
                await container.start()
            except DockerError as e:
                return Outcome(start_error=f"docker at {self.url} could not start the agent: {e.message}")
            pump = asyncio.create_task(_pump(out, collector))
            if stdin is not None:
                await _feed(stdin, launch.stdin or b"")
            timed_out = False
            try:
                async with asyncio.timeout(launch.timeout.total_seconds()):
                    status = await container.wait()
            except TimeoutError:
                timed_out = True
            if timed_out:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
            else:
                await asyncio.wait([pump], timeout=DRAIN_S)
                pump.cancel()
        fields = await collector.finish()
        if timed_out:
            return Outcome(timed_out=True, reason=f"killed at the {format_duration(launch.timeout)} timeout",
                           **fields)
        code = int(status.get("StatusCode", -1))
        state = (await container.show()).get("State", {})
        return self._ended(launch, code, bool(state.get("OOMKilled")), fields)

    def _ended(self, launch: Launch, code: int, oom: bool, fields: dict[str, Any]) -> Outcome:
        if code == 127 and (failed := _TINI_EXEC_FAILED.search(fields["output"])):
            return Outcome(start_error=f"agent command {launch.argv[0]!r} could not start in image "
                                       f"{launch.spec.image!r}: {failed.group(1)}", **fields)
        if oom:
            # The flag covers any process in the container; the agent itself may have survived.
            reason = f"OOM killed (memory limit {launch.spec.memory})"
            if code == 0:
                reason = f"a process of the agent was {reason}; the agent still exited 0"
            return Outcome(exit_code=code, reason=reason, extra={"oom_killed": "true"}, **fields)
        return Outcome(exit_code=code, reason=exit_reason(code, negative_is_signal=False), **fields)

    async def _image(self, docker: aiodocker.Docker, launch: Launch) -> dict[str, Any]:
        """The image's inspect data, pulling it first when allowed. Raises _StartError."""
        image = launch.spec.image
        if not image:
            raise _StartError("the docker backend needs sandbox.image")
        try:
            return await docker.images.inspect(image)
        except DockerError as e:
            if e.status != 404:
                raise _StartError(f"docker at {self.url} could not inspect image {image!r}: {e.message}") from e
        if launch.spec.pull == "never":
            raise _StartError(
                f"image {image!r} is not on the docker host {self.url} (node {self.node_name}); build or "
                f"load it there (docker build / docker load), or set sandbox.pull = \"if-missing\""
            )
        try:
            events = await docker.images.pull(image)
        except DockerError as e:
            raise _StartError(f"could not pull image {image!r} to the docker host {self.url}: {e.message}") from e
        errors = [ev["error"] for ev in events if isinstance(ev, dict) and ev.get("error")]
        if errors:
            raise _StartError(f"could not pull image {image!r} to the docker host {self.url}: {errors[-1]}")
        return await docker.images.inspect(image)

    async def _user(self, docker: aiodocker.Docker, image: dict[str, Any]) -> str:
        """The image's USER when it sets one; else its first regular user; else nobody."""
        declared = (image.get("Config") or {}).get("User") or ""
        if declared:
            return declared
        image_id = image["Id"]
        if image_id not in self._users:
            self._users[image_id] = await self._regular_user(docker, image_id)
        return self._users[image_id]

    async def _regular_user(self, docker: aiodocker.Docker, image_id: str) -> str:
        """Read the image's /etc/passwd through a created (never started) container."""
        probe = await docker.containers.create(
            {"Image": image_id, "Entrypoint": ["/kjob-user-probe"], "Labels": {LABEL_NODE: self.node_name},
             "NetworkDisabled": True}
        )
        try:
            archive = await probe.get_archive("/etc/passwd")
            member = archive.extractfile("passwd")
            text = member.read().decode(errors="replace") if member else ""
        except DockerError:
            text = ""
        finally:
            await _remove(probe, grace_s=0)
        return _first_regular_user(text) or NOBODY

    def _config(self, launch: Launch, user: str) -> dict[str, Any]:
        """The container's create body. Raises _StartError for a spec docker cannot honour."""
        spec = launch.spec
        if _SHARED_NETWORKS.match(spec.network):
            raise _StartError(
                f"network {spec.network!r} would share the node's (or a container's) network with the agent; "
                "use 'none' or a named Docker network"
            )
        workdir = spec.workdir or DEFAULT_WORKDIR
        if not workdir.startswith("/"):
            raise _StartError(f"sandbox.workdir must be an absolute path in the container, not {workdir!r}")
        host: dict[str, Any] = {
            "NetworkMode": spec.network,
            "ReadonlyRootfs": True,
            "Tmpfs": {workdir: TMPFS_OPTIONS, "/tmp": TMPFS_OPTIONS},
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "PidsLimit": spec.pids or DEFAULT_PIDS,
            "Init": True,  # tini as pid 1: forwards docker stop's SIGTERM, reaps zombies
            "LogConfig": {"Type": "none", "Config": {}},  # output comes through attach, never to disk
        }
        if spec.memory:
            try:
                memory = parse_size(spec.memory, "sandbox.memory")
            except InvalidInput as e:
                raise _StartError(str(e)) from None
            host["Memory"] = memory
            host["MemorySwap"] = memory  # no swap: the limit is the limit
        if spec.cpus:
            host["NanoCpus"] = int(spec.cpus * 1e9)
        env = {"HOME": workdir, **launch.env}
        return {
            "Image": spec.image,
            "Entrypoint": launch.argv[:1],  # the agent's argv is the whole command line
            "Cmd": launch.argv[1:],
            "Env": [f"{k}={v}" for k, v in env.items()],
            "WorkingDir": workdir,
            "User": user,
            "Labels": {
                LABEL_TENANT: launch.tenant,
                LABEL_JOB: launch.job_slug,
                LABEL_RUN: launch.run_id,
                LABEL_ATTEMPT: str(launch.attempt),
                LABEL_NODE: self.node_name,
            },
            "AttachStdout": True,
            "AttachStderr": True,
            "AttachStdin": launch.stdin is not None,
            "OpenStdin": launch.stdin is not None,
            "StdinOnce": launch.stdin is not None,
            "Tty": False,
            "HostConfig": host,
        }


def _container_name(launch: Launch) -> str:
    # Readable in `docker ps`, and unique even when a run's attempt is retried on this engine.
    base = re.sub(r"[^a-zA-Z0-9_.-]", "-", f"kjob-{launch.job_slug}-{launch.run_id[:8]}-{launch.attempt}")
    return f"{base}-{secrets.token_hex(3)}"


def _first_regular_user(passwd: str) -> str | None:
    """`uid:gid` of the first account with 1000 <= uid < 65534 in /etc/passwd text."""
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[2].isdigit() and fields[3].isdigit():
            if 1000 <= int(fields[2]) < 65534:
                return f"{fields[2]}:{fields[3]}"
    return None


async def _pump(stream: Any, collector: OutputCollector) -> None:
    while (message := await stream.read_out()) is not None:
        await collector.feed("stderr" if message.stream == 2 else "stdout", message.data)


async def _feed(stream: Any, data: bytes) -> None:
    # The agent may exit before reading its stdin; that is its business, not an error.
    with contextlib.suppress(aiohttp.ClientError, ConnectionError, RuntimeError):
        if data:
            await stream.write_in(data)
    with contextlib.suppress(aiohttp.ClientError, ConnectionError, RuntimeError):
        await stream.close()


async def _remove(container: DockerContainer, *, grace_s: int) -> None:
    """Stop (SIGTERM, `grace_s`, SIGKILL) and remove a container. Failures are logged: the
    container keeps its node label, so the next start() on this node removes it."""
    try:
        if grace_s:
            with contextlib.suppress(DockerError):  # already exited: 304, or gone: 404
                await container.stop(t=grace_s)
        await container.delete(force=True, v=True)
    except DockerError as e:
        if e.status != 404:
            log.warning("docker sandbox: could not remove container %s (%s); the next start() will",
                        container.id, e.message)
    except (aiohttp.ClientError, OSError) as e:
        log.warning("docker sandbox: could not remove container %s (%s); the next start() will", container.id, e)
