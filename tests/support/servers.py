"""Real servers for the tests: a NATS cluster, and fresh PostgreSQL databases cloned from a
migrated template (a clone takes milliseconds; migrating each test's database would not)."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from kjob.embedded import EmbeddedNats, EmbeddedPostgres
from kjob.errors import ServerError
from kjob.store.database import alembic_config, create_engine, migrate

TEMPLATE_DB = "kjob_template"
#: A JetStream cluster is ready once its nodes have elected a meta leader: seconds, not ms.
CLUSTER_READY_S = 30.0


def head_revision() -> str:
    """The newest migration this kjob ships."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "kjob ships no migrations"
    return head


async def current_revision(url: str) -> str | None:
    """The revision the database at `url` is at; None if it was never migrated."""
    engine = create_engine(url, pool_size=1, statement_timeout_s=None)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())
    finally:
        await engine.dispose()


class NatsCluster:
    """`size` nats-servers routed to each other, with JetStream (replicated streams work).

    Node `i` is `nodes[i]`, named `n<i>`; kill, stop and start nodes one by one for HA tests.
    """

    def __init__(self, base_dir: Path, size: int = 3) -> None:
        self.nodes = [
            EmbeddedNats(base_dir / f"n{i}", server_name=f"n{i}", cluster_port=0) for i in range(size)
        ]
        routes = [node.cluster_url for node in self.nodes if node.cluster_url]
        for node in self.nodes:
            node.routes = routes  # a route to itself is ignored by nats-server

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """All nodes as one comma-separated URL, as nats-py's `servers` accepts."""
        return ",".join(self.urls)

    def start(self, timeout: float = CLUSTER_READY_S) -> NatsCluster:
        # Launch all before waiting on any: no node is healthy until a quorum runs.
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_ready(timeout)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class TestDatabases:
    """Per-test databases on one PostgreSQL server, each a copy of a migrated template."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, server: EmbeddedPostgres) -> None:
        self.server = server
        self._admin: AsyncEngine | None = None
        self._names = (f"t{os.getpid()}_{n}" for n in itertools.count(1))
        #: Seconds each `create()` took, for the timings the suite reports.
        self.create_times: list[float] = []

    async def prepare(self) -> None:
        """Migrate the template once; connections to it are then refused, so clones never wait."""
        self._admin = create_async_engine(
            self.server.url, isolation_level="AUTOCOMMIT", pool_size=1, pool_pre_ping=True
        )
        await self._admin_sql(f'CREATE DATABASE "{TEMPLATE_DB}"')
        await migrate(self.server.url_for(TEMPLATE_DB))
        await self._admin_sql(f'ALTER DATABASE "{TEMPLATE_DB}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false')

    async def create(self) -> str:
        """A new database with the current schema and no rows; returns its URL."""
        name = next(self._names)
        started = time.perf_counter()
        # FILE_COPY: a median of ~15 ms here against ~100 ms for the default WAL_LOG, which
        # writes the whole template to the WAL; its checkpoints cost nothing with fsync off.
        await self._admin_sql(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}" STRATEGY FILE_COPY')
        self.create_times.append(time.perf_counter() - started)
        return self.server.url_for(name)

    async def drop(self, url: str) -> None:
        """Drop a database made by `create()`, closing any connection a test left open."""
        name = url.rsplit("/", 1)[1]
        await self._admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def _admin_sql(self, sql: str) -> None:
        assert self._admin is not None, "call prepare() first"
        try:
            async with self._admin.connect() as conn:
                await conn.execute(text(sql))
        except DBAPIError as exc:
            # Say whether the server itself went away, and what it logged: a bare
            # "connection was closed" tells nobody what happened.
            raise ServerError(
                f"{sql!r} failed on the tests' PostgreSQL (still running: {self.server.running}): "
                f"{exc.orig}\nits log ends with:\n{self.server.log_tail(40)}"
            ) from exc

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.dispose()
