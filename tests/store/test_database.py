"""The database layer: URLs, engines and migrations on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob.embedded import EmbeddedPostgres
from kjob.embedded.postgres import postgres_bin_dir
from kjob.errors import InvalidInput
from kjob.store.database import create_engine, migrate, normalize_url
from kjob.store.tables import metadata
from tests.support.servers import current_revision, head_revision


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://kjob:secret@db:5432/kjob",
        "postgres://kjob:secret@db:5432/kjob",
        "postgresql+asyncpg://kjob:secret@db:5432/kjob",
    ],
)
def test_postgres_urls_get_the_asyncpg_driver(url: str) -> None:
    assert normalize_url(url) == "postgresql+asyncpg://kjob:secret@db:5432/kjob"


@pytest.mark.parametrize("url", ["mysql://u@h/db", "sqlite:///kjob.db", "postgresql+psycopg://u@h/db", "not a url"])
def test_other_urls_are_refused_naming_the_field(url: str) -> None:
    with pytest.raises(InvalidInput) as err:
        normalize_url(url)
    assert err.value.field == "database_url"
    assert "postgresql://" in err.value.message  # says what to write instead


def _schema_diff(conn: Connection) -> list[object]:
    context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
    return list(compare_metadata(context, metadata))


async def test_migrated_schema_matches_the_tables_module(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        assert await conn.run_sync(_schema_diff) == []
        # The comparison does see differences: drop an index and it reports it.
        await conn.execute(text("DROP INDEX ix_job_runs_open"))
        diff = await conn.run_sync(_schema_diff)
        await conn.rollback()
    assert [d[0] for d in diff] == ["add_index"]  # type: ignore[index]


def _pg_dump_schema(server: EmbeddedPostgres, database: str) -> list[str]:
    """The database's DDL as sorted statements, each with its columns sorted: a migration
    that adds a column puts it last, and that order is no difference a user can notice."""
    result = subprocess.run(
        [str(postgres_bin_dir() / "pg_dump"), "--schema-only", "--no-owner", "--exclude-table=alembic_version",
         "-h", server.host, "-p", str(server.port), "-U", "postgres", database],
        capture_output=True, text=True, check=True,
    )
    statements = []
    for statement in result.stdout.split(";\n"):
        # Skip comments and psql meta-commands (`\restrict <random key>` differs per dump).
        lines = [line.strip().rstrip(",") for line in statement.splitlines()
                 if line.strip() and not line.startswith(("--", "\\"))]
        if lines and lines[0].startswith("CREATE TABLE"):
            lines = [lines[0], *sorted(lines[1:-1]), lines[-1]]
        statements.append("\n".join(lines))
    return sorted(statements)


async def test_migration_creates_the_same_ddl_as_the_tables_module(pg_server: EmbeddedPostgres) -> None:
    """Stricter than autogenerate: the full DDL (serials, partial indexes, ON DELETE) is equal."""
    suffix = uuid.uuid4().hex[:8]
    migrated_url = await asyncio.to_thread(pg_server.ensure_database, f"migrated_{suffix}")
    created_url = await asyncio.to_thread(pg_server.ensure_database, f"created_{suffix}")
    await migrate(migrated_url)
    created = create_engine(created_url)
    try:
        async with created.begin() as conn:
            await conn.run_sync(metadata.create_all)
    finally:
        await created.dispose()

    migrated_ddl = await asyncio.to_thread(_pg_dump_schema, pg_server, f"migrated_{suffix}")
    created_ddl = await asyncio.to_thread(_pg_dump_schema, pg_server, f"created_{suffix}")
    assert any(s.startswith("CREATE TABLE public.job_runs") for s in migrated_ddl)
    assert migrated_ddl == created_ddl


async def test_migrate_upgrades_a_new_database_once_even_when_nodes_race(pg_server: EmbeddedPostgres) -> None:
    url = await asyncio.to_thread(pg_server.ensure_database, f"fresh_{uuid.uuid4().hex[:8]}")
    assert await current_revision(url) is None

    revisions = await asyncio.gather(*(migrate(url) for _ in range(3)))

    assert revisions == [head_revision()] * 3
    assert await current_revision(url) == head_revision()


async def _select(engine: AsyncEngine, value: int) -> object:
    async with engine.connect() as conn:
        return await conn.scalar(text(f"SELECT {value}"))


async def test_an_engine_recovers_from_a_postgres_crash_after_at_most_one_error(tmp_path: Path) -> None:
    """What create_engine promises: the first disconnect error replaces the whole pool."""
    server = EmbeddedPostgres(tmp_path / "pg", durable=False)
    await asyncio.to_thread(server.start)
    engine = create_engine(server.url)
    try:
        # Fill the pool with connections to the server that is about to die.
        await asyncio.gather(*(_select(engine, i) for i in range(3)))
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start)

        errors = 0
        while await _try_select(engine) is False:
            errors += 1
            assert errors <= 1, "a second query after the restart still failed"
        assert await asyncio.gather(*(_select(engine, i) for i in range(3))) == [0, 1, 2]
    finally:
        await engine.dispose()
        await asyncio.to_thread(server.stop)


async def _try_select(engine: AsyncEngine) -> bool:
    try:
        return await _select(engine, 1) == 1
    except DBAPIError:
        return False


async def test_a_transaction_its_client_left_idle_gives_its_locks_up(database_url: str) -> None:
    """A client that stops mid-transaction (lost, wedged) must not hold its locks for ever: the
    server ends the session after three statement deadlines, and the lock is free again."""
    lost = create_engine(database_url, statement_timeout_s=0.5)  # idle limit: 2.5 s
    other = create_engine(database_url, statement_timeout_s=5)
    try:
        stuck = await lost.connect()
        await stuck.begin()
        await stuck.execute(text("SELECT pg_advisory_xact_lock(4242)"))
        # ...and nothing more from this client. Another one waits for the lock:
        started = asyncio.get_running_loop().time()
        async with other.connect() as conn:
            await conn.execute(text("SELECT pg_advisory_xact_lock(4242)"))
            waited = asyncio.get_running_loop().time() - started
            await conn.rollback()
        assert waited < 5, f"the lock was held {waited:.1f}s"
        with pytest.raises(DBAPIError):  # the idle session was ended by the server
            await stuck.execute(text("SELECT 1"))
        await stuck.invalidate()
    finally:
        await lost.dispose()
        await other.dispose()
