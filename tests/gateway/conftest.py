"""The gateway app on this test's real database, called in-process over ASGI.

`api` is a client holding an admin token of tenant `acme`; `client_for(tenant, role)` makes
more. `changes` records what the app announced through `on_job_changed`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob.config import Settings
from kjob.executor.agents import AgentRegistry
from kjob.gateway.app import create_app
from kjob.gateway.state import ChangeKind, GatewayState
from kjob.model.job import Job
from kjob.store.jobs import JobStore
from kjob.store.tokens import TokenStore

ClientFor = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
def changes() -> list[tuple[str, str, ChangeKind, bool]]:
    """(tenant, slug, kind, job given) per announced change, in order."""
    return []


@pytest.fixture
def state(engine: AsyncEngine, tmp_path: Path, changes: list[tuple[str, str, ChangeKind, bool]]) -> GatewayState:
    async def record(job: Job | None, tenant: str, slug: str, kind: ChangeKind) -> None:
        changes.append((tenant, slug, kind, job is not None))

    return GatewayState(
        settings=Settings(home=tmp_path),
        engine=engine,
        jobs=JobStore(engine),
        tokens=TokenStore(engine),
        agents=AgentRegistry.load(None),
        relay_configured=False,
        on_job_changed=record,
    )


@pytest.fixture
async def client_for(state: GatewayState) -> AsyncIterator[ClientFor]:
    app = create_app(state)
    clients: list[httpx.AsyncClient] = []

    async def make(tenant: str = "acme", role: str = "admin", *, token: str | None = None) -> httpx.AsyncClient:
        if token is None:
            _, token = await state.tokens.create(tenant, role, f"test {role}")
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
            base_url="http://kjob.test",
            headers={"Authorization": f"Bearer {token}"} if token else {},
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def api(client_for: ClientFor) -> httpx.AsyncClient:
    return await client_for("acme", "admin")
