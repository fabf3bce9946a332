"""Fixtures that give tests real servers: never mocks, never a skip when a server is missing.

Session-wide: ONE nats-server (`nats_server`, `nats_url`) and ONE PostgreSQL (`pg_server`),
started on first use under pytest's temp dir and stopped at the end. Per test: a fresh,
migrated database (`database_url`, `engine`), a fresh nats-server for tests that need their
own JetStream (`fresh_nats`), and a 3-node JetStream cluster on request (`nats_cluster`).
A server that cannot start raises ServerError, which fails the test loudly.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob.embedded import EmbeddedNats, EmbeddedPostgres
from kjob.store.database import create_engine
from tests.support.servers import NatsCluster, TestDatabases

#: Start-up times of the session's servers, printed at the end of the run.
_timings: dict[str, float] = {}
_databases: list[TestDatabases] = []


def _timed(name: str, start: Callable[[], object]) -> None:
    started = time.perf_counter()
    start()
    _timings[name] = time.perf_counter() - started


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """The session's nats-server (JetStream on). Shared: use unique stream and subject names,
    or `fresh_nats` for a JetStream of your own."""
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    _timed("nats-server start", server.start)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """The session's PostgreSQL. Not durable (no fsync): it only holds test data."""
    settings = {"max_connections": "300", "log_checkpoints": "off"}
    server = EmbeddedPostgres(tmp_path_factory.mktemp("postgres"), durable=False, settings=settings)
    _timed("postgres initdb + start", server.start)
    yield server
    server.stop()


@pytest.fixture(scope="session")
async def template_databases(pg_server: EmbeddedPostgres) -> AsyncIterator[TestDatabases]:
    databases = TestDatabases(pg_server)
    started = time.perf_counter()
    await databases.prepare()
    _timings["template database migration"] = time.perf_counter() - started
    _databases.append(databases)
    yield databases
    await databases.close()


@pytest.fixture
async def database_url(template_databases: TestDatabases) -> AsyncIterator[str]:
    """URL (postgresql+asyncpg) of a database of this test's own, migrated and empty."""
    url = await template_databases.create()
    yield url
    await template_databases.drop(url)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on this test's database. Fails the test if it leaves a connection checked out."""
    engine = create_engine(database_url, pool_size=5)
    yield engine
    leaked = engine.pool.checkedout()  # type: ignore[attr-defined]
    await engine.dispose()
    assert leaked == 0, f"the test left {leaked} database connection(s) checked out"


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server of this test's own, with an empty JetStream."""
    with EmbeddedNats(tmp_path / "fresh-nats") as server:
        yield server


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[Callable[..., NatsCluster]]:
    """Start a JetStream cluster: `cluster = nats_cluster()` (3 nodes) or `nats_cluster(5)`.

    Every node started is stopped after the test, whatever the test did to it.
    """
    clusters: list[NatsCluster] = []

    def start(size: int = 3) -> NatsCluster:
        cluster = NatsCluster(tmp_path / f"cluster{len(clusters)}", size)
        clusters.append(cluster)
        return cluster.start()

    yield start
    for cluster in clusters:
        cluster.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    times = [t for databases in _databases for t in databases.create_times]
    if not _timings and not times:
        return
    terminalreporter.section("server timings")
    for name, seconds in _timings.items():
        terminalreporter.write_line(f"{name}: {seconds * 1000:.0f} ms")
    if times:
        times.sort()
        terminalreporter.write_line(
            f"per-test database: {len(times)} created, median {times[len(times) // 2] * 1000:.0f} ms, "
            f"max {times[-1] * 1000:.0f} ms"
        )
