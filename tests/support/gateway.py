"""The gateway served by a real uvicorn on a free port, in a background thread with its own
event loop and its own engine (asyncpg connections belong to one loop), so sync CLI tests and
subprocesses can talk to it over real HTTP.

    with GatewayServer(database_url, home) as server:
        httpx.get(server.url + "/healthz")

Also the helpers both the gateway and the CLI tests use: `job_body` and `assert_error`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from kjob.config import Settings
from kjob.executor.agents import AgentRegistry
from kjob.gateway.app import create_app
from kjob.gateway.state import GatewayState
from kjob.store.database import create_engine
from kjob.store.jobs import JobStore
from kjob.store.runs import RunReads
from kjob.store.slots import SlotLedger
from kjob.store.tokens import TokenStore

START_DEADLINE_S = 10.0


def job_body(slug: str = "weekly-audit", **fields: object) -> dict[str, object]:
    """A valid job for the API, with `fields` replacing or adding to it."""
    return {
        "slug": slug,
        "prompt": "/k-housekeep",
        "agent": "kode",
        "schedule": "0 9 * * MON",
        "timezone": "Europe/Berlin",
        "output": {"channel": "none"},
        "timeout": "30m",
        **fields,
    }


#: Invariant 4: each bad input, as a change to `job_body()`, and the field the error must name.
INVALID_JOBS: list[tuple[str, dict[str, object], str]] = [
    ("invalid cron", {"schedule": "61 * * * *"}, "schedule"),
    ("unknown zone", {"timezone": "Mars/Olympus_Mons"}, "timezone"),
    ("unknown agent", {"agent": "nobody"}, "agent"),
    ("undeliverable channel", {"output": {"channel": "kode-chat:user-1"}}, "output.channel"),
    ("bad slug", {"slug": "Weekly Audit!"}, "slug"),
    ("empty prompt", {"prompt": "   "}, "prompt"),
    ("oversized prompt", {"prompt": "x" * (64 * 1024 + 1)}, "prompt"),
    ("bad duration", {"timeout": "30 minutes"}, "timeout"),
    ("once in the past", {"schedule": "@once 2020-01-01T09:00Z"}, "schedule"),
    ("NUL character", {"labels": {"team": "ops\x00"}}, "labels.team"),
]


def assert_error(response: httpx.Response, status: int, field: str | None) -> str:
    """Assert kjob's JSON error shape, status and field; return the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["field"] == field, body
    message = body["error"]["message"]
    assert message and "Traceback" not in message
    return message


class GatewayServer:
    def __init__(self, database_url: str, home: Path, *, relay_configured: bool = False) -> None:
        self._database_url = database_url
        self._home = home
        self._relay_configured = relay_configured
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.url = ""

    def __enter__(self) -> GatewayServer:
        self._thread = threading.Thread(target=self._run, name="kjob-test-gateway", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_DEADLINE_S
        while not (self._server and self._server.started):
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the test gateway did not start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the test gateway did not start within {START_DEADLINE_S}s")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=START_DEADLINE_S)
        assert not self._thread.is_alive(), "the test gateway did not stop"

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # reported to the starting thread
            self._error = e

    async def _serve(self) -> None:
        engine = create_engine(self._database_url, pool_size=2)
        state = GatewayState(
            settings=Settings(home=self._home),
            engine=engine,
            jobs=JobStore(engine),
            tokens=TokenStore(engine),
            runs=RunReads(engine),
            slots=SlotLedger(engine),
            agents=AgentRegistry.load(None),
            relay_configured=self._relay_configured,
        )
        config = uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        try:
            await self._server.serve()
        finally:
            await engine.dispose()
