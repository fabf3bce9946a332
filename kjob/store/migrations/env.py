"""Alembic environment for kjob's schema.

kjob runs migrations from code (`kjob.store.database.migrate`), which hands in an open
connection (already in a transaction, holding the migration lock). The `alembic` command line
works too, for writing new migrations: pass the database with `-x url=postgresql://...`.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from kjob.store.tables import metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True, compare_server_default=True)
    with context.begin_transaction():
        context.run_migrations()


def _run_from_command_line() -> None:
    from kjob.store.database import create_engine

    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("pass the database as `alembic -x url=postgresql://user@host/db ...`")

    async def run() -> None:
        engine = create_engine(url, pool_size=1)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(_run)
        finally:
            await engine.dispose()

    asyncio.run(run())


if context.is_offline_mode():
    raise SystemExit("kjob's migrations run online only: pass a database URL with -x url=...")

_given = context.config.attributes.get("connection")
if _given is not None:
    _run(_given)
else:
    _run_from_command_line()
