"""The docker backend: each attempt runs in a fresh, hardened container, removed at the end.

Hardened by default: no network (`none`), all capabilities dropped, no-new-privileges, a
read-only root filesystem with size-limited tmpfs at the work dir and /tmp, a pids limit, no
host path mounted (the engine's socket least of all), and a non-root user (the image's `USER`,
unless it is root, else its first regular user, else nobody). `egress` is a Docker network of
kjob's whose traffic to this host and to private ranges iptables drops. Every container carries
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
import shutil
from collections.abc import Sequence
from typing import Any

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError
from aiodocker.stream import Stream

from kjob.errors import InvalidInput, ServerError
from kjob.executor.sandbox.base import BLOCKED_RANGES, Launch, Outcome, OutputSink, Sandbox, network_refusal
from kjob.executor.sandbox.exits import exit_reason, oom_reason
from kjob.executor.sandbox.output import OutputCollector
from kjob.executor.sandbox.process import LAUNCHER_ENV
from kjob.model.durations import format_duration
from kjob.model.sizes import parse_size

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
DEFAULT_WORKDIR = "/work"
DEFAULT_PIDS = 256
#: The work dir and /tmp are tmpfs (RAM, charged to the container's memory limit); sized by
#: executor.sandbox_disk so a container without a memory limit cannot fill the node's RAM.
TMPFS_OPTIONS = "rw,exec,nosuid,nodev"
#: The Docker network of `sandbox.network = "egress"`, and its bridge (named, for iptables).
EGRESS_NETWORK, EGRESS_BRIDGE = "kjob-egress", "kjob-egress0"
#: docker stop's grace between SIGTERM and SIGKILL at a timeout or cancellation.
KILL_GRACE_S = 2
#: After the container exits, how long its attach stream may take to deliver the last output.
DRAIN_S = 2.0
#: How long the engine may take to answer at start().
PING_TIMEOUT_S = 10.0
#: Used when an image has no USER and no regular user in /etc/passwd.
NOBODY = (65534, 65534)
#: What docker-init (tini) prints when the agent's program does not exist in the image.
_TINI_EXEC_FAILED = re.compile(r"^\[FATAL tini \(\d+\)\] (exec .* failed: .*)$", re.MULTILINE)

LABEL_TENANT, LABEL_JOB, LABEL_RUN, LABEL_NODE = "kjob.tenant", "kjob.job", "kjob.run", "kjob.node"
LABEL_ATTEMPT = "kjob.attempt"


class _StartError(Exception):
    """The attempt cannot start; the message becomes Outcome.start_error. `permanent`: retrying
    would fail the same way (Outcome.permanent)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class DockerSandbox(Sandbox):
    """Runs agents in containers on one Docker engine.

    `node_name` labels every container, and start() reaps containers with this node's label:
    it must be unique per executor process on one engine. `docker_url` falls back to
    `$DOCKER_HOST`, then the local socket.
    """

    name = "docker"

    def __init__(self, node_name: str, docker_url: str | None = None, *, host_network_tenants: Sequence[str] = (),
                 disk_bytes: int = 512 * 1024**2) -> None:
        self.node_name = node_name
        self.host_network_tenants = frozenset(host_network_tenants)
        self.disk_bytes = disk_bytes
        #: None when the egress network is ready, else why not (said by runs that ask for it)
        self._egress_problem: str | None = "not started"
        self.url = docker_url or os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
        self._docker: aiodocker.Docker | None = None
        self._engine = "not started"
        #: image id -> (uid, gid) its containers run as (resolving it may need a probe container)
        self._users: dict[str, tuple[int, int]] = {}

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
        self._egress_problem = await self._prepare_egress()
        if self._egress_problem:
            log.warning("docker sandbox: no egress network (%s); jobs with network \"egress\" fail", self._egress_problem)
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
        return {"engine": self._engine, "egress": self._egress_problem or f"network {EGRESS_NETWORK}, private ranges dropped"}

    async def _prepare_egress(self) -> str | None:
        """Create the egress network (if missing) and its iptables rules (if missing): traffic
        from its bridge to this host (INPUT) and to BLOCKED_RANGES (DOCKER-USER) is dropped,
        and its containers cannot reach each other (no ICC). None when ready, else why not."""
        docker = self._require()
        try:
            await docker.networks.get(EGRESS_NETWORK)
        except DockerError as e:
            if e.status != 404:
                return f"cannot inspect network {EGRESS_NETWORK}: {e.message}"
            try:
                await docker.networks.create({
                    "Name": EGRESS_NETWORK, "Driver": "bridge", "Labels": {"kjob.network": "egress"},
                    "Options": {"com.docker.network.bridge.name": EGRESS_BRIDGE,
                                "com.docker.network.bridge.enable_icc": "false"},
                })
            except DockerError as e2:
                if e2.status != 409:  # another executor on this engine made it meanwhile
                    return f"cannot create network {EGRESS_NETWORK}: {e2.message}"
        iptables = shutil.which("iptables")
        if iptables is None:
            return "iptables is not installed"
        rules = [["INPUT", "-i", EGRESS_BRIDGE, "-j", "DROP"]]
        rules += [["DOCKER-USER", "-i", EGRESS_BRIDGE, "-d", net, "-j", "DROP"] for net in BLOCKED_RANGES]
        for rule in rules:
            if await _run(iptables, "-w", "-C", *rule) != 0 and await _run(iptables, "-w", "-I", *rule) != 0:
                return f"cannot add the iptables rule {' '.join(rule)} (the executor needs root for egress)"
        return None

    def _require(self) -> aiodocker.Docker:
        if self._docker is None:
            raise RuntimeError("DockerSandbox used before start()")
        return self._docker

    async def run(self, launch: Launch, on_output: OutputSink) -> Outcome:
        docker = self._require()
        # One deadline for the whole attempt: pulling the image and creating the container count.
        deadline = asyncio.get_running_loop().time() + launch.timeout.total_seconds()
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    image = await self._image(docker, launch)
                    config = self._config(launch, await self._user(docker, image))
                    container = await docker.containers.create(config, name=_container_name(launch))
            except _StartError as e:
                return Outcome(start_error=str(e), permanent=e.permanent)
            except TimeoutError:
                return Outcome(start_error=f"preparing image {launch.spec.image!r} on {self.url} took longer "
                                           f"than the {format_duration(launch.timeout)} timeout")
            try:
                return await self._attempt(container, launch, on_output, deadline)
            finally:
                # Also on timeout and cancellation: the container never outlives its attempt.
                await asyncio.shield(_remove(container, grace_s=KILL_GRACE_S))
        except (DockerError, aiohttp.ClientError, OSError) as e:
            # The engine failed us (it refused the container, or went away mid-attempt).
            message = e.message if isinstance(e, DockerError) else str(e) or type(e).__name__
            return Outcome(start_error=f"the Docker engine at {self.url} failed the attempt: {message}")

    async def _attempt(
        self, container: DockerContainer, launch: Launch, on_output: OutputSink, deadline: float
    ) -> Outcome:
        collector = OutputCollector(launch.output_cap_bytes, on_output, launch.run_id)
        status: dict[str, Any] | None = None
        async with contextlib.AsyncExitStack() as stack:
            # Attach before start, so not a byte of output is missed. stdin gets its own
            # attach: closing it is how the agent sees end-of-file (StdinOnce).
            out = await _attach(stack, container, stdout=True, stderr=True)
            stdin = await _attach(stack, container, stdin=True) if launch.stdin is not None else None
            await container.start()
            if launch.on_container is not None:
                launch.on_container(container.id)
            tasks = [asyncio.create_task(_pump(out, collector))]
            if stdin is not None:
                tasks.append(asyncio.create_task(_feed(stdin, launch.stdin or b"")))
            try:
                async with asyncio.timeout_at(deadline):
                    status = await container.wait()
            except TimeoutError:
                pass
            finally:
                if status is not None:  # exited: let the last output arrive
                    await asyncio.wait(tasks[:1], timeout=DRAIN_S)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        fields = await collector.finish()
        if status is None:
            return Outcome(timed_out=True, reason=f"killed at the {format_duration(launch.timeout)} timeout",
                           **fields)
        state = (await container.show()).get("State", {})
        return self._ended(launch, int(status.get("StatusCode", -1)), bool(state.get("OOMKilled")), fields)

    def _ended(self, launch: Launch, code: int, oom: bool, fields: dict[str, Any]) -> Outcome:
        if code == 127 and (failed := _TINI_EXEC_FAILED.search(fields["output"])):
            return Outcome(start_error=f"agent command {launch.argv[0]!r} could not start in image "
                                       f"{launch.spec.image!r}: {failed.group(1)}", permanent=True, **fields)
        if oom:
            return Outcome(exit_code=code, reason=oom_reason(code, launch.spec.memory), oom_killed=True,
                           **fields)
        return Outcome(exit_code=code, reason=exit_reason(code), **fields)

    async def _image(self, docker: aiodocker.Docker, launch: Launch) -> dict[str, Any]:
        """The image's inspect data, pulling it first when allowed. Raises _StartError."""
        image = launch.spec.image
        if not image:
            raise _StartError("the docker backend needs sandbox.image", permanent=True)
        try:
            return await docker.images.inspect(image)
        except DockerError as e:
            if e.status != 404:
                raise _StartError(f"docker at {self.url} could not inspect image {image!r}: {e.message}") from e
        if launch.spec.pull == "never":
            raise _StartError(
                f"image {image!r} is not on the docker host {self.url} (node {self.node_name}); build or "
                f"load it there (docker build / docker load), or set sandbox.pull = \"if-missing\"",
                permanent=True,
            )
        try:
            events = await docker.images.pull(image)
        except DockerError as e:
            raise _StartError(f"could not pull image {image!r} to the docker host {self.url}: {e.message}") from e
        errors = [ev["error"] for ev in events if isinstance(ev, dict) and ev.get("error")]
        if errors:
            raise _StartError(f"could not pull image {image!r} to the docker host {self.url}: {errors[-1]}")
        return await docker.images.inspect(image)

    async def _user(self, docker: aiodocker.Docker, image: dict[str, Any]) -> tuple[int, int]:
        """(uid, gid) to run as: the image's USER when it sets one (names looked up in the
        image's /etc/passwd and /etc/group), else its first regular user, else nobody.
        Numeric, because the work dir's tmpfs must be owned by that user. Never root."""
        declared = (image.get("Config") or {}).get("User") or ""
        numeric = re.fullmatch(r"(\d+):(\d+)", declared)
        if numeric:
            user = int(numeric.group(1)), int(numeric.group(2))
        else:
            image_id = image["Id"]
            if image_id not in self._users:
                passwd, group = await self._read_accounts(docker, image_id)
                self._users[image_id] = resolve_user(declared, passwd, group)
            user = self._users[image_id]
        # Root in a container is root of the host kernel (no user namespace): never an agent.
        return NOBODY if user[0] == 0 else user

    async def _read_accounts(self, docker: aiodocker.Docker, image_id: str) -> tuple[str, str]:
        """The image's /etc/passwd and /etc/group ("" when missing), read through a created,
        never started, container."""
        probe = await docker.containers.create(
            {"Image": image_id, "Entrypoint": ["/kjob-user-probe"], "Labels": {LABEL_NODE: self.node_name},
             "NetworkDisabled": True}
        )
        try:
            return await _read_file(probe, "/etc/passwd"), await _read_file(probe, "/etc/group")
        finally:
            await _remove(probe, grace_s=0)

    def _config(self, launch: Launch, user: tuple[int, int]) -> dict[str, Any]:
        """The container's create body. Raises _StartError for a spec docker cannot honour."""
        spec = launch.spec
        uid, gid = user
        if refused := network_refusal(launch, self.host_network_tenants):
            raise _StartError(refused, permanent=True)
        if spec.network == "egress" and self._egress_problem:
            raise _StartError(f"sandbox.network = \"egress\" is unavailable on this node: {self._egress_problem}")
        workdir = spec.workdir or DEFAULT_WORKDIR
        if not workdir.startswith("/"):
            raise _StartError(f"sandbox.workdir must be an absolute path in the container, not {workdir!r}")
        tmpfs = f"{TMPFS_OPTIONS},size={self.disk_bytes}"
        host: dict[str, Any] = {
            "NetworkMode": EGRESS_NETWORK if spec.network == "egress" else spec.network,
            "ReadonlyRootfs": True,
            # runc keeps the mode of a directory the image already has at the mount point, so the
            # work dir is made the user's own rather than world-writable.
            "Tmpfs": {workdir: f"{tmpfs},uid={uid},gid={gid},mode=0700", "/tmp": f"{tmpfs},mode=1777"},
            "Binds": [], "Mounts": [], "Devices": [],  # nothing of the host: no path, no socket, no device
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
            "User": f"{uid}:{gid}",
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


def resolve_user(declared: str, passwd: str, group: str) -> tuple[int, int]:
    """(uid, gid) for an image's USER (`name`, `uid`, `name:group`, ...) given its /etc/passwd
    and /etc/group text; an empty USER means its first user with 1000 <= uid < 65534, or nobody.

    :raises _StartError: USER names a user or group the image does not have.
    """
    users = [f for f in (line.split(":") for line in passwd.splitlines()) if len(f) >= 4 and f[2].isdigit() and f[3].isdigit()]
    if not declared:
        regular = [(int(f[2]), int(f[3])) for f in users if 1000 <= int(f[2]) < 65534]
        return regular[0] if regular else NOBODY
    user, _, grp = declared.partition(":")
    entry = next((f for f in users if f[0] == user or f[2] == user), None)
    if entry is None and not user.isdigit():
        raise _StartError(f"the image's USER {user!r} is not in its /etc/passwd")
    uid = int(entry[2]) if entry else int(user)
    gid = int(entry[3]) if entry else uid
    if grp:
        groups = {f[0]: f[2] for f in (line.split(":") for line in group.splitlines()) if len(f) >= 3 and f[2].isdigit()}
        if not grp.isdigit() and grp not in groups:
            raise _StartError(f"the image's USER group {grp!r} is not in its /etc/group")
        gid = int(grp) if grp.isdigit() else int(groups[grp])
    return uid, gid


async def _run(*argv: str) -> int:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL, env=LAUNCHER_ENV)
    return await proc.wait()


async def _read_file(container: DockerContainer, path: str) -> str:
    try:
        archive = await container.get_archive(path)
    except DockerError:
        return ""
    member = archive.extractfile(os.path.basename(path))
    return member.read().decode(errors="replace") if member else ""


async def _attach(stack: contextlib.AsyncExitStack, container: DockerContainer, *, stdin: bool = False,
                  stdout: bool = False, stderr: bool = False) -> Stream:
    """An attach connection to the container, open now and closed with `stack`."""
    stream = container.attach(stdin=stdin, stdout=stdout, stderr=stderr)
    await stream.__aenter__()
    stack.push_async_callback(stream.close)
    return stream


async def _pump(stream: Stream, collector: OutputCollector) -> None:
    while (message := await stream.read_out()) is not None:
        await collector.feed("stderr" if message.stream == 2 else "stdout", message.data)


async def _feed(stream: Stream, data: bytes) -> None:
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
