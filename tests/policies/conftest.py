"""Helpers for the policy tests: HTTP clients of a running node's API, and the CLI and
in-process gateway fixtures of tests/cli and tests/gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob.model.run import Run
from tests.support.pipeline import node_clients
from tests.cli.conftest import base_env, home, kjob, one_line_error, runner_for, server, token  # noqa: F401
from tests.gateway.conftest import api, changes, client_for, state  # noqa: F401

NodeClient = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def node_client(engine: AsyncEngine) -> AsyncIterator[NodeClient]:
    """`await node_client(node, role="operator")`: an HTTP client of the node's API, holding a
    token of tenant `default` (the tenant of `tests.support.pipeline.create_job`)."""
    async with node_clients(engine, "operator", "policy test") as make:
        yield make


def never_overlap(runs: list[Run]) -> None:
    """Assert that no two of `runs` (those that started) ran at the same time."""
    started = sorted((r for r in runs if r.started_at is not None), key=lambda r: r.started_at)
    for before, after in zip(started, started[1:]):
        assert before.finished_at is not None and before.finished_at <= after.started_at, (
            f"run {after.id} started at {after.started_at} while {before.id} ran "
            f"({before.started_at} to {before.finished_at})"
        )
