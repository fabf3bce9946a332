"""Connecting to PostgreSQL and migrating its schema (Alembic, run from code).

The migrations live in the package (`kjob/store/migrations`), so an installed kjob migrates
its database without an alembic.ini or a checkout: `await migrate(url)`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from kjob.errors import InvalidInput

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

#: Held while migrating, so nodes that start together migrate one after the other.
_MIGRATION_LOCK_ID = 0x6B6A6F62  # "kjob"

_POSTGRES_DRIVERS = {"postgresql", "postgres", "postgresql+asyncpg"}


def normalize_url(url: str) -> str:
    """Return `url` with the asyncpg driver (`postgresql+asyncpg://`), or raise InvalidInput.

    Accepts `postgresql://`, `postgres://` (as Heroku and others write it) and
    `postgresql+asyncpg://`.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidInput(
            f"{url!r} is not a database URL; write e.g. postgresql://user:password@host:5432/kjob",
            "database_url",
        ) from None
    if parsed.drivername not in _POSTGRES_DRIVERS:
        raise InvalidInput(
            f"kjob needs PostgreSQL, not {parsed.drivername!r}; "
            "write the URL as postgresql://user:password@host:5432/kjob",
            "database_url",
        )
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


#: Deadlines of every statement, unless the caller sets its own (DatabaseSettings holds the node's).
STATEMENT_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
POOL_TIMEOUT_S = 10.0


def create_engine(
    url: str,
    *,
    pool_size: int = 20,
    statement_timeout_s: float | None = STATEMENT_TIMEOUT_S,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    pool_timeout_s: float = POOL_TIMEOUT_S,
) -> AsyncEngine:
    """An async engine for `url` (any form `normalize_url` accepts).

    Every call has a deadline: a stalled server (SIGSTOPped, a black-holed connection) must
    surface as an error the caller can act on, never as an await that outlives the executor's
    claim. asyncpg's `command_timeout` bounds each statement on the client side, where a
    paused or unreachable server cannot stop it from firing; PostgreSQL's own
    `statement_timeout` (a little longer) frees the server from statements nobody waits for any
    more; connecting and waiting for a pooled connection have theirs; a session left idle inside
    a transaction (its client lost) is ended by the server after three statement deadlines, so
    its locks go with it. `statement_timeout_s=None` lifts these deadlines (migrations may build
    indexes for minutes).

    No `pool_pre_ping`: it would add a round trip to every statement of the hot path. After a
    PostgreSQL restart, the first disconnect error invalidates the whole pool (SQLAlchemy does
    that on any disconnect), so callers see one error, and every loop of kjob retries.
    """
    normalized = normalize_url(url)
    parsed = make_url(normalized)
    connect_args: dict[str, object] = {"timeout": connect_timeout_s}
    if statement_timeout_s is not None:
        connect_args["command_timeout"] = statement_timeout_s
        connect_args["server_settings"] = {
            "statement_timeout": str(int(statement_timeout_s * 1000) + 1000),
            # kjob never waits between the statements of a transaction on anything but itself:
            # a session idle in one this long has a client that is gone or lost (seen after
            # faults: a claim left open for minutes, its job's lock with it, stalling the job).
            "idle_in_transaction_session_timeout": str(int(statement_timeout_s * 3000) + 1000),
        }
    if not {"ssl", "sslmode"} & set(parsed.query) and (parsed.host in (None, "", "localhost", "127.0.0.1", "::1")):
        # asyncpg tries TLS first by default: on loopback that is a wasted round trip per connect.
        connect_args["ssl"] = False
    engine = create_async_engine(
        normalized,
        pool_size=pool_size,
        # Overflow connections are closed when returned: with executors, dispatchers and the
        # ticker sharing one engine, a small pool would connect and disconnect all day.
        max_overflow=pool_size * 2,
        pool_recycle=1800,
        pool_timeout=pool_timeout_s,
        connect_args=connect_args,
    )
    event.listen(engine.sync_engine, "handle_error", _drop_connections_in_doubt)
    return engine


def _drop_connections_in_doubt(ctx) -> None:
    """A statement that timed out, or a connection whose protocol state is off (asyncpg:
    "another operation is in progress"), must not go back to the pool: the next caller would
    inherit the half-finished exchange. SQLAlchemy only knows the driver's disconnect messages;
    say so here too, for that one connection (the others are fine)."""
    if ctx.is_disconnect:
        return
    if _in_doubt(ctx.original_exception):
        ctx.is_disconnect = True
        ctx.invalidate_pool_on_disconnect = False


def _in_doubt(err: BaseException | None) -> bool:
    while err is not None:
        if isinstance(err, (TimeoutError, OSError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError,
                            asyncpg.PostgresConnectionError)):
            return True
        err = err.__cause__
    return False


@asynccontextmanager
async def raw_connection(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """The asyncpg connection under a pooled one, for the hot statements sent without
    SQLAlchemy. Its errors bypass SQLAlchemy's handling, so one that leaves the connection in
    doubt invalidates it here rather than pool it."""
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        try:
            yield raw.driver_connection
        except BaseException as err:
            if _in_doubt(err) or not isinstance(err, Exception):
                await conn.invalidate()
            raise


#: What a database call raises, whether the server refused the statement or is away: for the
#: callers whose work is bookkeeping (logged, never fatal); `is_transient` tells them apart.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError,
    OSError, TimeoutError)

#: SQLSTATE classes a retry may get past: 08 connection exception; 57 operator intervention
#: (shutdown, a terminated backend, our own statement timeout); 53 insufficient resources
#: (too many connections); 40 serialization failure or deadlock.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "57", "53", "40")


def is_transient(err: BaseException) -> bool:
    """Whether a database call may pass if tried again: the server, or the way to it, is away
    (disconnects, deadlines, a server starting or shutting down). Anything else is a statement
    the database refuses (a constraint, a foreign key to a deleted job, a bug): it fails the
    same way every time, and must not be retried forever."""
    if isinstance(err, (OSError, TimeoutError)):
        return True
    if isinstance(err, DBAPIError):
        if err.connection_invalidated:
            return True
        # SQLAlchemy's adapter error; the asyncpg error it stands for is its cause.
        inner = getattr(err.orig, "__cause__", None) or err.orig
        if inner is not None and inner is not err and is_transient(inner):
            return True
        sqlstate = getattr(err.orig, "sqlstate", None) or getattr(inner, "sqlstate", None)
        if sqlstate:
            return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
        return isinstance(err, (OperationalError, InterfaceError))
    if isinstance(err, asyncpg.PostgresError):
        return (err.sqlstate or "")[:2] in _TRANSIENT_SQLSTATE_CLASSES
    # asyncpg's client-side errors: the connection closed or is unusable ("another operation
    # is in progress" after a cancelled statement).
    return isinstance(err, (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError))


def alembic_config() -> Config:
    """The Alembic configuration of kjob's migrations (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


async def migrate(engine_or_url: AsyncEngine | str) -> str:
    """Upgrade the database to the newest schema; return the revision it is at.

    Safe to call on every start and from several nodes at once: the upgrade runs in one
    transaction under an advisory lock, so it is all or nothing and never runs twice.
    """

    def upgrade(conn: Connection) -> str | None:
        # A migration may build an index for minutes: lift the node's statement deadline here.
        conn.execute(text("SET LOCAL statement_timeout = 0"))
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
        config = alembic_config()
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
        return MigrationContext.configure(conn).get_current_revision()

    async with _engine(engine_or_url) as engine:
        async with engine.begin() as conn:
            revision = await conn.run_sync(upgrade)
    assert revision is not None
    return revision


@asynccontextmanager
async def _engine(engine_or_url: AsyncEngine | str) -> AsyncIterator[AsyncEngine]:
    """Use an engine as given, or make one for a URL and dispose of it afterwards."""
    if isinstance(engine_or_url, AsyncEngine):
        yield engine_or_url
        return
    engine = create_engine(engine_or_url, pool_size=1, statement_timeout_s=None)
    try:
        yield engine
    finally:
        await engine.dispose()


#: SQLSTATE classes of errors caused by the rows a statement was given (22: data exception,
#: 23: integrity constraint violation): the same rows fail again however often they are tried.
_ROW_ERROR_CLASSES = ("22", "23")


def sqlstate(err: BaseException) -> str | None:
    """The SQLSTATE of a database error, raw asyncpg or wrapped by SQLAlchemy; None for
    anything else (a dropped connection, a timeout)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(code, str) and len(code) == 5:
            return code
        current = getattr(current, "orig", None) or current.__cause__
    return None


def is_row_error(err: BaseException) -> bool:
    """Whether `err` is permanent for the rows written (see _ROW_ERROR_CLASSES): retrying
    them is pointless, leaving them out is the way on. Anything else may pass (transient)."""
    code = sqlstate(err)
    return code is not None and code[:2] in _ROW_ERROR_CLASSES


async def clock_offset(engine: AsyncEngine, readings: int = 3) -> tuple[float, float]:
    """(offset, uncertainty): seconds the database's clock is ahead of ours (negative: behind),
    read across a round trip and taken at its middle, and half that round trip, within which the
    true offset lies. The shortest of `readings` round trips counts: a loaded host's slow one
    says little. Slots are judged by the database's clock, as claims are: a ticker whose host
    clock runs ahead must not fire early."""
    best: tuple[float, float] | None = None
    async with engine.connect() as conn:
        for _ in range(readings):
            sent = time.time()
            theirs = (await conn.execute(text("SELECT extract(epoch FROM clock_timestamp())"))).scalar_one()
            back = time.time()
            if best is None or (back - sent) / 2 < best[1]:
                best = (float(theirs) - (sent + back) / 2, (back - sent) / 2)
    assert best is not None
    return best


class DatabaseClock:
    """This host's reading of the database's clock, which slots, claims and look-ahead holds go
    by (the ticker's and the executor's): the offset measured by `measure`, and kept while the
    database is away. `who` names the role in what it logs."""

    def __init__(self, engine: AsyncEngine, who: str) -> None:
        self.engine, self.who = engine, who
        #: Seconds the database's clock is ahead of this host's (negative: behind).
        self.offset = 0.0
        #: How far `offset` may be off (half the round trip it was read across).
        self.uncertainty = 0.0
        #: Whether `offset` was ever read (until then it is 0: this host's own clock).
        self.measured = False

    def now_ts(self) -> float:
        """Now by the database's clock, epoch seconds."""
        return time.time() + self.offset

    async def measure(self) -> None:
        """Read the offset again; keep the last one while the database is away (the caller's
        loop tries again), and say so when the host's clock is off by more than a second."""
        try:
            offset, uncertainty = await clock_offset(self.engine)
        except Exception as err:
            if not is_transient(err):
                raise
            log.warning("%s: cannot read the database's clock (%r); keeping an offset of %.1fs",
                        self.who, err, self.offset)
            return
        if abs(offset - self.offset) > 1.0:
            log.warning("%s: this host's clock is %.1fs %s the database's; going by the database's",
                        self.who, abs(offset), "behind" if offset > 0 else "ahead of")
        self.offset, self.uncertainty, self.measured = offset, uncertainty, True

    def not_before_offset(self) -> float:
        """The offset to wait for an instant by: the database's clock may be up to the
        uncertainty behind what `offset` says, and a run must not start before its instant."""
        return self.offset - self.uncertainty
