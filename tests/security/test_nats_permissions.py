"""deploy/nats/nats-server.conf: the pipeline runs under it with one node per role, each
connected as its own user (ticker -> executor -> dispatcher -> Relay, run-now, live logs and
status through the API), the server logs no permission violation, and the users cannot step outside
their role (an observer publishes nothing; an executor cannot schedule runs)."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import nats
import pytest

from kjob.embedded import EmbeddedNats
from kjob.embedded.credentials import new_password
from kjob.embedded.nats import NATS_USERS, PERMISSIONS_FILE
from kjob.model.run import DeliveryStatus
from kjob.store.tokens import TokenStore
from tests.support.pipeline import fast_settings, running_node, until
from tests.support.relay import RecordingRelay

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "nats" / "nats-server.conf"
USERS = NATS_USERS


@pytest.fixture
def secured_nats(tmp_path: Path):
    assert CONFIG.resolve() == PERMISSIONS_FILE  # production's file is the one `kjob up` uses
    passwords = {user: new_password() for user in USERS}
    with EmbeddedNats(tmp_path / "nats", users=passwords) as server:
        server.urls = {user: server.url_for(user) for user in USERS}
        yield server


def violations(server: EmbeddedNats) -> list[str]:
    log = (server.data_dir / "nats-server.log").read_text(errors="replace")
    return [line for line in log.splitlines() if "Violation" in line or "Authorization Error" in line]


async def test_the_pipeline_runs_with_one_user_per_role(tmp_path, secured_nats, database_url, engine) -> None:
    urls = secured_nats.urls
    events: list[tuple[str, dict]] = []
    observer = await nats.connect(urls["observer"])

    async def observe(msg) -> None:
        events.append((msg.subject, json.loads(msg.data)))

    await observer.subscribe("kjob.event.>", cb=observe)
    _, token = await TokenStore(engine).create("acme", "operator")
    _, editor_token = await TokenStore(engine).create("acme", "editor")

    with RecordingRelay() as relay:
        async with AsyncExitStack() as stack:
            nodes = {}
            for role in ("ticker", "executor", "dispatcher", "api"):
                settings = fast_settings(tmp_path / role, relay_url=relay.url, node_name=f"node-{role}")
                nodes[role] = await stack.enter_async_context(
                    running_node(settings, urls[role], database_url, roles=frozenset({role})))
            api = nodes["api"].api_url
            async with httpx.AsyncClient(base_url=api, headers={"Authorization": f"Bearer {editor_token}"}) as editor:
                created = await editor.post("/v1/jobs", json={
                    "slug": "every-second", "prompt": "echo tick", "agent": "shell", "schedule": "@every 1s",
                    "output": {"channel": "kode-chat:ops"}})
                assert created.status_code == 201, created.text
                await editor.post("/v1/jobs", json={
                    "slug": "talks", "prompt": "echo first; sleep 1.5; echo live-line", "agent": "shell",
                    "schedule": "@every 1h", "output": {"channel": "none"}})

                async def delivered():
                    runs = (await editor.get("/v1/jobs/every-second/runs")).json()
                    return any(r["delivery_status"] == DeliveryStatus.delivered.value for r in runs)
                await until(delivered, 30, "a scheduled run delivered to Relay")

            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=api, headers=headers, timeout=30) as operator:
                run = (await operator.post("/v1/jobs/talks/run")).json()
                await until(lambda: _status(operator, run["id"], "running"), 15, "run-now to start")
                async with operator.stream("GET", f"/v1/runs/{run['id']}/logs", params={"follow": "true"}) as live:
                    followed = "".join([chunk async for chunk in live.aiter_text()])
                status = await operator.get("/v1/status")
                assert status.status_code == 200, (status.text, violations(secured_nats))  # streams, nodes, leader
            assert "first" in followed and "live-line" in followed

            await until(lambda: _seen(events, {"job_changed", "run_started", "run_finished", "run_dispatched"}),
                        10, "every kind of event at the observer")
    await observer.close()

    assert violations(secured_nats) == []
    # events travel on their tenant's subjects only
    assert all(subject.split(".")[2] == event["tenant"] == "acme" for subject, event in events)


async def _status(client: httpx.AsyncClient, run_id: str, status: str) -> bool:
    return (await client.get(f"/v1/runs/{run_id}")).json()["status"] in (status, "succeeded")


async def _seen(events: list[tuple[str, dict]], kinds: set[str]) -> bool:
    return kinds <= {event["kind"] for _, event in events}


@pytest.mark.parametrize(("user", "subject"), [
    ("observer", "kjob.run.due.acme"),
    ("observer", "kjob.event.acme.job_changed"),
    ("executor", "kjob.run.due.acme"),
    ("dispatcher", "kjob.run.result.acme"),
    ("api", "kjob.run.result.acme"),
    ("ticker", "kjob.log.acme.some-run"),
])
async def test_a_user_cannot_publish_outside_its_role(secured_nats, user: str, subject: str) -> None:
    errors: list[Exception] = []

    async def on_error(err: Exception) -> None:
        errors.append(err)

    nc = await nats.connect(secured_nats.urls[user], error_cb=on_error)
    try:
        await nc.publish(subject, b"{}")
        await nc.flush()
        await until(lambda: _true(errors), 5, "the server to refuse the publish")
    finally:
        await nc.close()
    assert "permissions violation" in str(errors[0]).lower()
    assert any(subject in line for line in violations(secured_nats))


async def test_an_observer_cannot_read_what_is_not_an_event(secured_nats) -> None:
    errors: list[Exception] = []

    async def on_error(err: Exception) -> None:
        errors.append(err)

    nc = await nats.connect(secured_nats.urls["observer"], error_cb=on_error)
    try:
        for subject in ("kjob.log.>", "_INBOX.>", "kjob.run.due.>"):
            await nc.subscribe(subject)
        await nc.flush()
        await until(lambda: _true(len(errors) >= 3 and errors), 5, "the server to refuse the subscriptions")
    finally:
        await nc.close()
    assert all("permissions violation" in str(e).lower() for e in errors)


async def _true(value):
    return value
