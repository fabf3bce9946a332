"""One real `kjob up` for every client test (sync and async), and a tenant of each test's own:
its admin token comes from `client.tokens.create` of the admin tenant, so tests never see
each other's jobs."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator

import pytest

from kjob.client import AsyncClient, Client
from tests.support.servers import TestDatabases
from tests.support.up import KjobUp

#: A tenant with tiny quotas, for QuotaExceeded and RateLimited.
TINY = "tiny"
_tenants = itertools.count(1)


@pytest.fixture(scope="package")
async def up(template_databases: TestDatabases, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KjobUp]:
    database_url = await template_databases.create()
    quotas = f'{{"{TINY}": {{"max_jobs": 1, "run_now_per_minute": 1}}}}'
    try:
        with KjobUp(tmp_path_factory.mktemp("client") / "home", database_url, KJOB_QUOTAS__TENANTS=quotas) as running:
            yield running
    finally:
        await template_databases.drop(database_url)


@pytest.fixture
def admin(up: KjobUp) -> Iterator[Client]:
    """The admin of the admin tenant (`kjob up`'s own token)."""
    with Client(up.url, up.token) as client:
        yield client


def tenant_token(admin: Client, tenant: str | None = None, role: str = "admin") -> str:
    return admin.tokens.create(role, name="client test", tenant=tenant or f"client-{next(_tenants)}").secret  # type: ignore[arg-type]


@pytest.fixture
def client(up: KjobUp, admin: Client) -> Iterator[Client]:
    """A blocking client, admin of a fresh tenant."""
    with Client(up.url, tenant_token(admin)) as kjob:
        yield kjob


@pytest.fixture
async def aclient(up: KjobUp, admin: Client) -> AsyncIterator[AsyncClient]:
    """An asyncio client, admin of a fresh tenant."""
    async with AsyncClient(up.url, tenant_token(admin)) as kjob:
        yield kjob


def job(slug: str, **fields: object) -> dict[str, object]:
    """A job the process sandbox of `kjob up` can run."""
    return {"slug": slug, "prompt": "echo hello from $KJOB_JOB", "agent": "shell", "schedule": "0 9 * * MON",
            "timezone": "Europe/Berlin", **fields}

