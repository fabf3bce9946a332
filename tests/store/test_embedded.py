"""The embedded servers: real nats-server and PostgreSQL processes, restarted, killed, orphaned."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from sqlalchemy import text

from kjob.embedded import EmbeddedNats, EmbeddedPostgres
from kjob.errors import InvalidInput, ServerError
from kjob.store.database import create_engine
from tests.support.servers import NatsCluster

DEADLINE_S = 10.0


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (exited, waiting for someone to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {DEADLINE_S}s waiting for {what}")
        time.sleep(0.02)


# PostgreSQL


async def _scalar(url: str, sql: str) -> object:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(sql))
            return result.scalar() if result.returns_rows else None
    finally:
        await engine.dispose()


async def test_postgres_keeps_its_data_across_stop_and_kill(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg", durable=False)
    await asyncio.to_thread(server.start)
    try:
        url = await asyncio.to_thread(server.ensure_database, "kept")
        await _scalar(url, "CREATE TABLE notes AS SELECT 'written before the restart'::text AS body")

        await asyncio.to_thread(server.stop)
        assert not server.running
        await asyncio.to_thread(server.start)
        assert await _scalar(url, "SELECT body FROM notes") == "written before the restart"

        await _scalar(url, "INSERT INTO notes VALUES ('committed before the crash')")
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start)
        assert await _scalar(url, "SELECT count(*) FROM notes") == 2
        assert server.url.endswith(f":{server.port}/postgres")  # same port, so old URLs still work
    finally:
        await asyncio.to_thread(server.stop)


def test_ensure_database_is_idempotent_and_checks_the_name(pg_server: EmbeddedPostgres) -> None:
    url = pg_server.ensure_database("ensure_twice")
    assert pg_server.ensure_database("ensure_twice") == url
    assert pg_server.psql("SELECT count(*) FROM pg_database WHERE datname = 'ensure_twice'").strip() == "1"

    with pytest.raises(InvalidInput) as err:
        pg_server.ensure_database('x"; DROP DATABASE postgres; --')
    assert err.value.field == "database"


def test_postgres_refuses_a_data_dir_holding_something_else(tmp_path: Path) -> None:
    data_dir = tmp_path / "not-pg"
    data_dir.mkdir()
    (data_dir / "notes.txt").write_text("mine")

    with pytest.raises(ServerError, match="not empty but holds no PostgreSQL data"):
        EmbeddedPostgres(data_dir).start()
    assert (data_dir / "notes.txt").read_text() == "mine"


# NATS


async def test_nats_keeps_jetstream_messages_across_stop_and_kill(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats")
    await asyncio.to_thread(server.start)
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="KEPT", subjects=["kept.>"])
        for i in range(3):
            await js.publish("kept.msg", f"message {i}".encode())
        await nc.close()

        for stop in (server.stop, server.kill):
            await asyncio.to_thread(stop)
            assert not server.running
            await asyncio.to_thread(server.start)
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            info = await js.stream_info("KEPT")
            last = await js.get_msg("KEPT", seq=3)
            await nc.close()
            assert info.state.messages == 3
            assert last.data == b"message 2"
    finally:
        await asyncio.to_thread(server.stop)


def test_nats_that_cannot_listen_fails_with_its_log(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = EmbeddedNats(tmp_path / "nats", port=busy.getsockname()[1])
        with pytest.raises(ServerError, match="exited with code") as err:
            server.start()
    assert "address already in use" in str(err.value)
    assert not server.running


def test_a_clustered_server_needs_a_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as err:
        EmbeddedNats(tmp_path, cluster_port=0)
    assert err.value.field == "server_name"


async def test_a_replicated_stream_survives_losing_a_node(nats_cluster: Callable[..., NatsCluster]) -> None:
    cluster = nats_cluster()
    nc = await nats.connect(cluster.urls)
    try:
        js = nc.jetstream()
        await js.add_stream(name="HA", subjects=["ha.>"], num_replicas=3)
        await js.publish("ha.x", b"before")

        victim = next(n for n in cluster.nodes if n.url != nc.connected_url.geturl())  # type: ignore[union-attr]
        victim.kill()
        # If the victim led the stream, the others elect a new leader first: retry until then.
        deadline = time.monotonic() + 20
        while True:
            try:
                await js.publish("ha.x", b"during", timeout=1)
                break
            except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError):
                if time.monotonic() > deadline:
                    raise
        await asyncio.to_thread(victim.start, 30)

        assert (await js.stream_info("HA")).state.messages == 2
    finally:
        await nc.close()


# No orphans


_HOLDER = """
import asyncio, sys
from pathlib import Path
from kjob.embedded import EmbeddedNats, EmbeddedPostgres

async def main():
    # Started from worker threads, as `kjob up` does: the servers must still outlive them.
    n = await asyncio.to_thread(EmbeddedNats(Path(sys.argv[1]) / "nats").start)
    p = await asyncio.to_thread(EmbeddedPostgres(Path(sys.argv[1]) / "pg", durable=False).start)
    print(n.pid, p.pid, flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def test_servers_die_with_a_killed_parent(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2],
    )
    pids: list[int] = []
    try:
        assert holder.stdout is not None
        pids = [int(p) for p in holder.stdout.readline().split()]
        assert len(pids) == 2 and not any(_gone(pid) for pid in pids)

        holder.kill()
        holder.wait()

        for pid in pids:
            _wait_for(partial(_gone, pid), f"server {pid} to exit after its parent was killed")
    finally:
        holder.kill()
        holder.wait()
        for pid in pids:  # only if the test failed: do not leave its servers behind
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
