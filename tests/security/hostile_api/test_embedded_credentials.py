"""Attack 3 of issue 10: under `kjob up`, a job with the host's network reached the embedded
NATS and PostgreSQL, which had no credentials. The test process stands in for that job: it is
on the host, it knows the ports, it does not have the credentials file."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import tomllib
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.errors import NoServersError

from kjob.embedded.nats import EmbeddedNats
from kjob.embedded.postgres import EmbeddedPostgres, postgres_bin_dir
from tests.support.pipeline import until
from tests.support.up import Up

ROLE_USERS = ("ticker", "executor", "dispatcher", "api", "observer")


def _pg_port(home: Path) -> int:
    return int((home / "postgres" / "postmaster.pid").read_text().splitlines()[3])


def _nats_port(home: Path) -> int:
    return int((home / "nats.port").read_text())


def _listening_ports(pids: set[int]) -> set[int]:
    """The TCP ports on which any of `pids` listens (from /proc: what an attacker would scan)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _tree(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


async def _nats_refused(url: str) -> str:
    errors: list[Exception] = []

    async def on_error(err: Exception) -> None:
        errors.append(err)

    with pytest.raises((NoServersError, nats.errors.Error, OSError)):
        nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, max_reconnect_attempts=0,
                                connect_timeout=2)
        await nc.close()
    return " ".join(str(e) for e in errors).lower()


async def _subscription_refused(url: str, subject: str) -> bool:
    errors: list[Exception] = []

    async def on_error(err: Exception) -> None:
        errors.append(err)

    seen: list[bytes] = []

    async def on_message(msg) -> None:
        seen.append(msg.data)

    nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False)
    try:
        await nc.subscribe(subject, cb=on_message)
        await nc.flush()
        await until(lambda: _value(errors), 5, f"the server to refuse a subscription to {subject}")
    finally:
        await nc.close()
    return "permissions violation" in str(errors[0]).lower() and not seen


async def _value(value):
    return value


async def _pg_refused(**connect) -> str:
    with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError,
                        asyncpg.ClientCannotConnectError, OSError)) as caught:
        conn = await asyncpg.connect(timeout=5, **connect)
        await conn.close()
    return str(caught.value)


def _old_home(home: Path) -> None:
    """A home as a kjob without credentials left it: a trusting PostgreSQL, an open NATS."""
    old_pg = EmbeddedPostgres(home / "postgres", durable=False)
    with old_pg:
        old_pg.ensure_database("kjob")
        old_pg.psql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)", database="kjob")
    assert "trust" in (home / "postgres" / "pg_hba.conf").read_text()
    with EmbeddedNats(home / "nats"):
        pass


async def test_nothing_of_kjob_up_listens_without_credentials(tmp_path: Path) -> None:
    """Also the upgrade: the home starts as an older kjob left it, and a restart reuses all."""
    home = tmp_path / "home"
    _old_home(home)
    up = Up(home).start()
    try:
        creds_file = home / "credentials.toml"
        for private in (creds_file, home / "admin.token", home / "secret.key"):
            assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
        creds = tomllib.loads(creds_file.read_text())
        assert set(creds["nats"]) == set(ROLE_USERS)
        # acme's job talks while the attacker listens
        created = up.client.post("/v1/jobs", json={"slug": "talks", "prompt": "echo acme-secret-output",
                                                   "agent": "shell", "schedule": "@every 1h",
                                                   "output": {"channel": "none"}})
        assert created.status_code == 201, created.text
        run = up.client.post("/v1/jobs/talks/run").json()
        await until(lambda: asyncio.to_thread(
            lambda: up.client.get(f"/v1/runs/{run['id']}").json()["status"] == "succeeded"),
            30, "a run with each role on its own NATS user")
        assert up.client.get("/v1/status").status_code == 200

        nats_port, pg_port = _nats_port(home), _pg_port(home)
        api_port = int(up.client.base_url.port)
        # Every port kjob up's processes listen on is one of these three, each checked below:
        # no unauthenticated monitoring port, no stray listener.
        assert _listening_ports(_tree(up.proc.pid)) == {api_port, nats_port, pg_port}
        assert up.client.get("/v1/jobs", headers={"Authorization": ""}).status_code == 401

        # NATS: no user, a wrong password, and each other user on acme's live output
        assert "authorization violation" in await _nats_refused(f"nats://127.0.0.1:{nats_port}")
        assert "authorization violation" in await _nats_refused(f"nats://api:guess@127.0.0.1:{nats_port}")
        for user in ROLE_USERS:
            url = f"nats://{user}:{creds['nats'][user]}@127.0.0.1:{nats_port}"
            assert await _subscription_refused(url, "kjob.log.acme.>"), user

        # PostgreSQL: no password and a wrong one, over TCP; and no unix socket to try
        for password in (None, "postgres", ""):
            message = await _pg_refused(host="127.0.0.1", port=pg_port, user="postgres", database="kjob",
                                        password=password)
            assert "password" in message.lower(), message
        sockets = [p for d in (home / "postgres", Path("/tmp"), Path("/var/run/postgresql"), Path("/run"))
                   if d.is_dir() for p in d.glob(f".s.PGSQL.{pg_port}")]
        assert sockets == []
        hba = (home / "postgres" / "pg_hba.conf").read_text()
        rules = [line.split() for line in hba.splitlines() if line.strip() and not line.startswith("#")]
        assert rules and all(rule[-1] == "scram-sha-256" for rule in rules), hba
        psql = subprocess.run([str(postgres_bin_dir() / "psql"), "-w", "-h", "127.0.0.1", "-p", str(pg_port),
                               "-U", "postgres", "-d", "kjob", "-c", "SELECT prompt FROM jobs"],
                              capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
        assert psql.returncode != 0 and "acme" not in psql.stdout
        # ... while kjob's own password opens it, and the older kjob's data survived the upgrade
        conn = await asyncpg.connect(host="127.0.0.1", port=pg_port, user="postgres", database="kjob",
                                     password=creds["postgres"]["password"])
        try:
            assert await conn.fetchval("SELECT x FROM kept") == 42
        finally:
            await conn.close()
    finally:
        assert up.stop() == 0, up.logs()
    log = (home / "nats" / "nats-server.log").read_text()
    # kjob's own roles stayed inside their permissions; the refusals above are the attacker's
    own = [line for line in log.splitlines() if "Violation" in line and "kjob.log.acme" not in line
           and "Authorization Violation" not in line]
    assert own == []

    # A restart reuses the credentials and keeps working.
    before = creds_file.read_text()
    up = Up(home).start()
    try:
        assert creds_file.read_text() == before
        run = up.client.post("/v1/jobs/talks/run").json()
        await until(lambda: asyncio.to_thread(
            lambda: up.client.get(f"/v1/runs/{run['id']}").json()["status"] == "succeeded"),
            30, "a run after the restart")
    finally:
        assert up.stop() == 0, up.logs()


def test_the_credentials_file_is_private_stable_and_completed(tmp_path: Path) -> None:
    from kjob.embedded.credentials import EmbeddedCredentials
    from kjob.embedded.nats import PASSWORD_PATTERN

    path = tmp_path / "credentials.toml"
    first = EmbeddedCredentials.ensure(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert EmbeddedCredentials.ensure(path) == first
    assert all(PASSWORD_PATTERN.fullmatch(pw) for pw in [first.postgres_password, *first.nats.values()])
    # an older or hand-edited file: a user missing, a password nats-server would read as a number
    path.write_text(f'[postgres]\npassword = "{first.postgres_password}"\n[nats]\napi = "-12"\n')
    path.chmod(0o644)
    again = EmbeddedCredentials.ensure(path)
    assert again.postgres_password == first.postgres_password
    assert set(again.nats) == set(ROLE_USERS) and again.nats["api"] != "-12"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
