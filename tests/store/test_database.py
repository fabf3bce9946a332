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
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob.embedded import EmbeddedPostgres
from kjob.embedded.postgres import postgres_bin_dir
from kjob.errors import InvalidInput
from kjob.store.database import create_engine, current_revision, head_revision, migrate, normalize_url
from kjob.store.tables import metadata


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


def _pg_dump_schema(server: EmbeddedPostgres, database: str) -> str:
    result = subprocess.run(
        [str(postgres_bin_dir() / "pg_dump"), "--schema-only", "--no-owner", "--exclude-table=alembic_version",
         "-h", server.host, "-p", str(server.port), "-U", "postgres", database],
        capture_output=True, text=True, check=True,
    )
    return "\n".join(line for line in result.stdout.splitlines() if not line.startswith("\\restrict")
                     and not line.startswith("\\unrestrict"))


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
    assert "CREATE TABLE public.job_runs" in migrated_ddl
    assert migrated_ddl == created_ddl


async def test_migrate_upgrades_a_new_database_once_even_when_nodes_race(pg_server: EmbeddedPostgres) -> None:
    url = await asyncio.to_thread(pg_server.ensure_database, f"fresh_{uuid.uuid4().hex[:8]}")
    assert await current_revision(url) is None

    revisions = await asyncio.gather(*(migrate(url) for _ in range(3)))

    assert revisions == [head_revision()] * 3
    assert await current_revision(url) == head_revision()


async def test_create_engine_reconnects_after_a_postgres_restart(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg", durable=False)
    await asyncio.to_thread(server.start)
    engine = create_engine(server.url)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT 1")) == 1
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start)
        # The pooled connection is dead; pre-ping replaces it instead of failing the query.
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT 2")) == 2
    finally:
        await engine.dispose()
        await asyncio.to_thread(server.stop)
