"""One real `kjob up` for every client test (sync and async), and a tenant of each test's own:
its admin token comes from `client.tokens.create` of the admin tenant, so tests never see
each other's jobs."""

from __future__ import annotations

import inspect
import json
import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from kjob.client import AsyncClient, Client
from tests.support.servers import TestDatabases
from tests.support.up import KjobUp

#: Tenants with tiny quotas, for QuotaExceeded and RateLimited: one per kind of client.
TINY = {"sync": "tiny-sync", "async": "tiny-async"}
_tenants = itertools.count(1)


@pytest.fixture(scope="package")
async def up(template_databases: TestDatabases, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KjobUp]:
    database_url = await template_databases.create()
    quotas = json.dumps({name: {"max_jobs": 1, "run_now_per_minute": 1} for name in TINY.values()})
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


def job(slug: str, **fields: object) -> dict[str, object]:
    """A job the process sandbox of `kjob up` can run."""
    return {"slug": slug, "prompt": "echo hello from $KJOB_JOB", "agent": "shell", "schedule": "0 9 * * MON",
            "timezone": "Europe/Berlin", **fields}



@pytest.fixture(params=["sync", "async"])
async def api(request: pytest.FixtureRequest, up: KjobUp, admin: Client) -> AsyncIterator[Client | AsyncClient]:
    """Each test once with `Client` and once with `AsyncClient`, admin of a fresh tenant; the
    test reads answers through `done` and `collect`, which take either kind."""
    token = tenant_token(admin)
    if request.param == "sync":
        with Client(up.url, token) as kjob:
            yield kjob
    else:
        async with AsyncClient(up.url, token) as akjob:
            yield akjob


async def done(answer: Any) -> Any:
    """The value of a sync call, or of an async one once awaited."""
    return await answer if inspect.isawaitable(answer) else answer


async def collect(items: Any) -> list[Any]:
    """Everything a sync or async iterator yields."""
    if hasattr(items, "__aiter__"):
        return [item async for item in items]
    return list(items)


def kind(api: Client | AsyncClient) -> str:
    return "sync" if isinstance(api, Client) else "async"


def like(api: Client | AsyncClient, url: str, token: str) -> Client | AsyncClient:
    """A client of the same kind as `api`, elsewhere or as someone else."""
    return Client(url, token) if isinstance(api, Client) else AsyncClient(url, token)


async def close(client: Client | AsyncClient) -> None:
    await done(client.close() if isinstance(client, Client) else client.aclose())
