"""RelayClient against a real HTTP server: what arrives, and how each failure is reported."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import AsyncIterator, Iterator

import pytest

from kjob.dispatcher.relay import RelayClient, channel_kind
from kjob.errors import InvalidInput, RelayRejected, RelayUnavailable
from kjob.model.targets import AllowList
from kjob.model.run import RunStatus, dispatch_payload
from tests.support.relay import RecordingRelay

RUN_ID = "0b7e9c1a-5d2f-5c3e-9a41-6f0d2e8b7c55"
TOKEN = "relay-secret"
#: The webhook recorder listens on loopback, which webhooks may reach only when allow-listed.
LOOPBACK = AllowList.parse(["127.0.0.1"])
PAYLOAD = dispatch_payload("weekly-audit", "kode-chat:user-1", RunStatus.succeeded, "all good", "http://kjob/runs/1")


@pytest.fixture
async def relay() -> AsyncIterator[RecordingRelay]:
    async with RecordingRelay(token=TOKEN) as server:
        yield server


@pytest.fixture
async def webhook() -> AsyncIterator[RecordingRelay]:
    async with RecordingRelay() as server:
        yield server


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL nothing listens on: the port stays bound (so no one else takes it) but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_relay_receives_the_payload_with_run_id_as_idempotency_key_and_the_token(relay: RecordingRelay) -> None:
    async with RelayClient(relay.url, TOKEN, timeout_s=5) as client:
        status = await client.dispatch("kode-chat:user-1", PAYLOAD, RUN_ID)

    assert status == 200
    [request] = relay.requests
    assert (request.method, request.path) == ("POST", "/v1/dispatch")
    assert request.json == PAYLOAD
    assert request.idempotency_key == RUN_ID
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["content-type"] == "application/json"


async def test_a_relay_base_url_with_a_path_and_trailing_slash_keeps_its_path(relay: RecordingRelay) -> None:
    async with RelayClient(relay.url + "/relay/", TOKEN, timeout_s=5) as client:
        await client.dispatch("kode-chat:user-1", PAYLOAD, RUN_ID)

    assert relay.requests[0].path == "/relay/v1/dispatch"


async def test_503_is_unavailable_and_the_retry_carries_the_same_key(relay: RecordingRelay) -> None:
    relay.fail(status=503, count=1)
    async with RelayClient(relay.url, TOKEN, timeout_s=5) as client:
        with pytest.raises(RelayUnavailable) as err:
            await client.dispatch("kode-chat:user-1", PAYLOAD, RUN_ID)
        assert await client.dispatch("kode-chat:user-1", PAYLOAD, RUN_ID) == 200

    assert err.value.status_code == 503
    assert "Relay at http://127.0.0.1" in str(err.value) and "answered 503" in str(err.value)
    assert [r.status for r in relay.requests] == [503, 200]
    assert {r.idempotency_key for r in relay.requests} == {RUN_ID}


async def test_a_timed_outage_ends_on_time(relay: RecordingRelay) -> None:
    async with RelayClient(relay.url, TOKEN, timeout_s=5) as client:
        # Connected first: on a loaded machine a first request (a new connection) can take
        # longer than the whole outage, which would then never be seen.
        await client.dispatch("kode-chat:user-1", PAYLOAD, "warm-up")
        relay.clear()
        relay.fail(status=502, seconds=0.3)
        started = time.monotonic()
        while True:
            try:
                await client.dispatch("kode-chat:user-1", PAYLOAD, RUN_ID)
                break
            except RelayUnavailable:
                assert time.monotonic() - started < 5, "the outage never ended"
                await asyncio.sleep(0.02)

    statuses = [r.status for r in relay.requests]
    assert statuses[0] == 502 and statuses[-1] == 200
    assert relay.accepted[0].at - started >= 0.3


async def test_400_is_rejected_with_status_and_body(relay: RecordingRelay) -> None:
    relay.fail(status=400, count=1)
    async with RelayClient(relay.url, TOKEN, timeout_s=5) as client:
        with pytest.raises(RelayRejected) as err:
            await client.dispatch("kode-chat:user-1", PAYLOAD, RUN_ID)

    assert err.value.status_code == 400
    assert 'answered 400: {"ok": false, "status": 400}' in str(err.value)


async def test_a_wrong_token_is_rejected_and_says_which_setting_to_fix(relay: RecordingRelay) -> None:
    async with RelayClient(relay.url, "stale-token", timeout_s=5) as client:
        with pytest.raises(RelayRejected) as err:
            await client.dispatch("kode-chat:user-1", PAYLOAD, RUN_ID)

    assert err.value.status_code == 401
    assert "KJOB_RELAY_TOKEN" in str(err.value)


@pytest.mark.parametrize("status", [408, 429])
async def test_rate_limits_and_request_timeouts_are_retried_not_dropped(relay: RecordingRelay, status: int) -> None:
    relay.fail(status=status, count=1)
    async with RelayClient(relay.url, TOKEN, timeout_s=5) as client:
        with pytest.raises(RelayUnavailable) as err:
            await client.dispatch("kode-chat:user-1", PAYLOAD, RUN_ID)

    assert err.value.status_code == status


async def test_connection_refused_is_unavailable(refused_url: str) -> None:
    async with RelayClient(refused_url, TOKEN, timeout_s=5) as client:
        with pytest.raises(RelayUnavailable) as err:
            await client.dispatch("kode-chat:user-1", PAYLOAD, RUN_ID)

    assert err.value.status_code is None
    assert f"cannot reach Relay at {refused_url}" in str(err.value)


async def test_no_answer_within_the_timeout_is_unavailable_and_does_not_wait_longer(relay: RecordingRelay) -> None:
    relay.delay(seconds=10, count=1)
    started = time.monotonic()
    async with RelayClient(relay.url, TOKEN, timeout_s=0.3) as client:
        with pytest.raises(RelayUnavailable) as err:
            await client.dispatch("kode-chat:user-1", PAYLOAD, RUN_ID)

    assert time.monotonic() - started < 3
    assert "did not answer within 0.3s" in str(err.value)
    assert len(relay.requests) == 1  # it did arrive: why the retry carries the same key


async def test_without_relay_a_webhook_channel_posts_to_the_url_without_the_relay_token(
    webhook: RecordingRelay,
) -> None:
    channel = f"webhook:{webhook.url}/hooks/T0/B1?tag=kjob"
    async with RelayClient(None, TOKEN, timeout_s=5, allow_private=LOOPBACK) as client:
        assert await client.dispatch(channel, PAYLOAD, RUN_ID) == 200

    [request] = webhook.requests
    assert (request.method, request.path) == ("POST", "/hooks/T0/B1?tag=kjob")
    assert request.json == PAYLOAD
    assert request.idempotency_key == RUN_ID
    assert "authorization" not in request.headers


async def test_with_relay_a_webhook_channel_goes_through_relay(relay: RecordingRelay, webhook: RecordingRelay) -> None:
    async with RelayClient(relay.url, TOKEN, timeout_s=5) as client:
        await client.dispatch(f"webhook:{webhook.url}/hook", PAYLOAD, RUN_ID)

    assert [r.path for r in relay.requests] == ["/v1/dispatch"]
    assert webhook.requests == []


async def test_a_webhook_error_names_the_host_but_not_the_secret_path(webhook: RecordingRelay) -> None:
    webhook.fail(status=404, count=1)
    async with RelayClient(None, None, timeout_s=5, allow_private=LOOPBACK) as client:
        with pytest.raises(RelayRejected) as err:
            await client.dispatch(f"webhook:{webhook.url}/hooks/s3cr3t-t0ken", PAYLOAD, RUN_ID)

    assert f"webhook at {webhook.url} answered 404" in str(err.value)
    assert "check the job's webhook URL" in str(err.value)
    assert "s3cr3t" not in str(err.value)


async def test_a_relay_channel_without_relay_is_rejected_before_any_request() -> None:
    async with RelayClient(None, None, timeout_s=5) as client:
        with pytest.raises(RelayRejected) as err:
            await client.dispatch("kode-chat:user-1", PAYLOAD, RUN_ID)

    assert "needs a Relay: set KJOB_RELAY_URL" in str(err.value)


async def test_wait_for_returns_once_a_delivery_lands_and_names_what_arrived_when_not(relay: RecordingRelay) -> None:
    relay.delay(seconds=0.2, count=1)
    async with RelayClient(relay.url, TOKEN, timeout_s=5) as client:
        sending = asyncio.create_task(client.dispatch("kode-chat:user-1", PAYLOAD, RUN_ID))
        await relay.wait_for(lambda r: len(r.requests) == 1, timeout=5)
        assert await sending == 200

    with pytest.raises(AssertionError, match=r"requests so far: \['POST /v1/dispatch -> 200'\]"):
        await relay.wait_for(lambda r: len(r.accepted) == 2, timeout=0.1)

    # The sync form, from a thread, woken by the second request.
    waiting = asyncio.create_task(asyncio.to_thread(relay.wait_until, lambda r: len(r.requests) == 2, 5))
    async with RelayClient(relay.url, TOKEN, timeout_s=5) as client:
        await client.dispatch("kode-chat:user-1", PAYLOAD, RUN_ID)
    await asyncio.wait_for(waiting, 5)


def test_a_relay_url_that_is_not_http_is_refused_at_start() -> None:
    with pytest.raises(InvalidInput) as err:
        RelayClient("relay.example:8080", None, timeout_s=5)
    assert err.value.field == "relay_url"


@pytest.mark.parametrize(
    ("channel", "relay_configured", "kind"),
    [
        ("none", False, "none"),
        ("none", True, "none"),
        ("webhook:https://hooks.example/x", False, "webhook"),
        ("webhook:https://hooks.example/x", True, "relay"),
        ("kode-chat:user-1", True, "relay"),
        ("slack:#ops", True, "relay"),
    ],
)
def test_channel_kind_says_how_a_channel_is_delivered(channel: str, relay_configured: bool, kind: str) -> None:
    assert channel_kind(channel, relay_configured) == kind


def test_a_relay_channel_without_relay_is_invalid_input_naming_the_field_and_the_fix() -> None:
    with pytest.raises(InvalidInput) as err:
        channel_kind("kode-chat:x", relay_configured=False)

    assert err.value.field == "output.channel"
    assert err.value.message == (
        "channel 'kode-chat:x' needs a Relay: set KJOB_RELAY_URL, or use 'webhook:https://...' or 'none'"
    )
