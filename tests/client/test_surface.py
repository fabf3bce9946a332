"""The two clients offer the same calls with the same signatures, and the package exports what
docs/sdk.md names (no server needed: nothing is sent)."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import kjob.client
from kjob.client import AsyncClient, Client

RESOURCES = ("jobs", "runs", "tokens", "secrets", "audit", "quotas")


def calls(client: object) -> dict[str, inspect.Signature]:
    found = {"status": inspect.signature(client.status)}  # type: ignore[attr-defined]
    for resource in RESOURCES:
        for name, member in inspect.getmembers(getattr(client, resource)):
            if not name.startswith("_") and callable(member):
                found[f"{resource}.{name}"] = inspect.signature(member)
    return found


def test_sync_and_async_clients_have_the_same_calls() -> None:
    with Client("http://127.0.0.1:9", "kjob_x") as sync:
        sync_calls = calls(sync)
    asynchronous = AsyncClient("http://127.0.0.1:9", "kjob_x")
    async_calls = calls(asynchronous)
    asyncio.run(asynchronous.aclose())
    assert sync_calls == async_calls
    documented = Path(__file__).parents[2].joinpath("docs", "sdk.md").read_text()
    for call, signature in sync_calls.items():
        assert "self" not in signature.parameters
        assert f"`{call}(" in documented, f"docs/sdk.md does not show {call}"


def test_exports() -> None:
    assert sorted(kjob.client.__all__) == sorted(n for n in vars(kjob.client) if not n.startswith("_"))
    for name in kjob.client.__all__:
        assert getattr(kjob.client, name) is not None
