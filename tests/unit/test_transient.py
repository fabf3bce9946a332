"""Which database errors a caller may retry (the database is away) and which it must not (the
statement is refused, and would be every time): kjob.store.database.is_transient."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError

from kjob.store.database import is_transient


def wrapped(cls, err: Exception) -> DBAPIError:
    """As SQLAlchemy raises it: its adapter error, caused by the driver's."""
    adapter = Exception(str(err))
    adapter.__cause__ = err
    return cls("UPDATE job_runs ...", {}, adapter)


@pytest.mark.parametrize("err", [
    TimeoutError(),
    ConnectionRefusedError(),
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"),
    asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.exceptions.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
    asyncpg.InterfaceError("connection is closed"),
    asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
])
def test_the_database_being_away_is_transient(err):
    assert is_transient(err)
    assert is_transient(wrapped(DBAPIError, err))


@pytest.mark.parametrize("err", [
    asyncpg.exceptions.ForeignKeyViolationError("insert or update on table violates foreign key constraint"),
    asyncpg.exceptions.UniqueViolationError("duplicate key value violates unique constraint"),
    asyncpg.exceptions.UndefinedColumnError('column "nope" does not exist'),
    ValueError("a bug"),
])
def test_a_refused_statement_is_permanent(err):
    assert not is_transient(err)
    assert not is_transient(wrapped(IntegrityError, err))
