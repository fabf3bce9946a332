"""What the client does on the wire, counted by a proxy between it and a real `kjob up`:
retries of idempotent calls after a connection error (and none of the others), timeouts,
and where it finds the API and its token when given neither."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from kjob.client import AsyncClient, Client, ServerUnavailable
from tests.client.conftest import close, collect, done, job, like, tenant_token
from tests.support.proxy import FlakyProxy
from tests.support.up import KjobUp

Api = Client | AsyncClient


def upstream(up: KjobUp) -> tuple[str, int]:
    parts = urlsplit(up.url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


async def test_idempotent_calls_are_retried_after_a_dropped_connection(api: Api, up: KjobUp, admin: Client) -> None:
    token = tenant_token(admin)
    with FlakyProxy(upstream(up), drop=2) as proxy:
        flaky = like(api, proxy.url, token)
        try:
            assert await collect(flaky.jobs.list()) == []  # two dropped connections, then an answer
            assert proxy.accepted == 3
        finally:
            await close(flaky)
    with FlakyProxy(upstream(up), drop=1) as proxy:
        flaky = like(api, proxy.url, token)
        try:
            with pytest.raises(ServerUnavailable):  # a create is not sent twice: it might have landed
                await done(flaky.jobs.create(job("once")))
            assert proxy.accepted == 1
        finally:
            await close(flaky)


async def test_a_server_that_never_answers_times_out(api: Api) -> None:
    with FlakyProxy(("127.0.0.1", 9), hold=True) as proxy:
        hung = Client(proxy.url, "kjob_x", timeout_s=0.3) if isinstance(api, Client) else \
            AsyncClient(proxy.url, "kjob_x", timeout_s=0.3)
        started = time.monotonic()
        try:
            with pytest.raises(ServerUnavailable) as timed_out:
                await done(hung.quotas.get())
        finally:
            await close(hung)
        assert time.monotonic() - started < 5 and "did not answer (ReadTimeout" in str(timed_out.value)
        assert proxy.accepted == 1  # a read timeout is not retried: the server may still be at it


def test_url_and_token_as_the_cli_finds_them(up: KjobUp, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("KJOB_API_URL", "KJOB_TOKEN", "KJOB_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KJOB_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("KJOB_HOME", str(up.home))  # the api.url and admin.token files `kjob up` wrote
    with Client() as kjob:
        assert kjob.url == up.url and kjob.quotas.get().tenant == "default"
    monkeypatch.setenv("KJOB_HOME", str(tmp_path))
    monkeypatch.setenv("KJOB_API_URL", up.url)
    monkeypatch.setenv("KJOB_TOKEN", up.token)
    with Client() as kjob:
        assert kjob.quotas.get().tenant == "default"
