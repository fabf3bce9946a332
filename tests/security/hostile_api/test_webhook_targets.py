"""Attack 4 of issue 10: a job's webhook pointed the dispatcher at the node's own services.

Refused when the job is saved (the address, or what the name resolves to) and again when the
dispatcher connects, on the address it actually connects to; an operator's allow-list
(`dispatcher.allow_private_targets`) lets chosen ones through."""

from __future__ import annotations

import pytest

from kjob.model.run import DeliveryStatus
from kjob.store.jobs import JobStore
from kjob.store.runs import RunReads
from kjob.store.slots import SlotLedger
from tests.security.conftest import job_body
from tests.support.pipeline import fast_settings, running_node, until
from tests.support.relay import RecordingRelay

HOSTILE = [
    "http://127.0.0.1:{port}/internal",
    "http://localhost:{port}/internal",
    "http://LOCALHOST.:{port}/internal",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://0.0.0.0:{port}/",
    "http://224.0.0.1/",
    "http://[::1]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",
    "http://[::ffff:7f00:1]:{port}/",
    "http://[fd00::1]/",
    "http://[fe80::1]/",
    "http://2130706433:{port}/",
    "http://0177.0.0.1:{port}/",
    "http://0x7f.1:{port}/",
    "http://127.1:{port}/",
    "https://user:pw@127.0.0.1:{port}/",
]


@pytest.fixture
def hook():
    with RecordingRelay() as server:
        yield server


def _port(hook: RecordingRelay) -> int:
    return int(hook.url.rsplit(":", 1)[1])


async def test_a_private_webhook_is_refused_at_create(client_for, hook) -> None:
    editor = await client_for("beta", "editor")
    assert (await editor.post("/v1/jobs", json=job_body("fine"))).status_code == 201
    for url in HOSTILE:
        target = "webhook:" + url.format(port=_port(hook))
        answer = await editor.post("/v1/jobs", json=job_body("ssrf", output={"channel": target}))
        assert answer.status_code == 422, (url, answer.text)
        assert answer.json()["error"]["field"] == "output.channel", url
        message = answer.json()["error"]["message"]
        # httpx itself refuses some spellings (0177.0.0.1): no request could go there either
        assert "allow_private_targets" in message or "cannot be used" in message, (url, message)
        # ... and on every other way in: apply, and replacing a harmless job
        applied = await editor.post("/v1/jobs:apply", json={"jobs": [job_body("ssrf", output={"channel": target})]})
        assert applied.status_code == 422 and applied.json()["error"]["field"] == "jobs.0.output.channel", url
        changed = await editor.put("/v1/jobs/fine", json=job_body("fine", output={"channel": target}))
        assert changed.status_code == 422, (url, changed.text)
    jobs = (await editor.get("/v1/jobs")).json()  # nothing stored
    assert [(j["slug"], j["output"]["channel"]) for j in jobs] == [("fine", "none")]
    assert hook.requests == []


async def test_a_public_or_unresolvable_webhook_is_accepted(client_for) -> None:
    editor = await client_for("beta", "editor")
    for i, url in enumerate(["https://93.184.215.14/x", "https://hooks.example/x", "http://[2606:4700::1111]/"]):
        answer = await editor.post("/v1/jobs", json=job_body(f"ok-{i}", output={"channel": f"webhook:{url}"}))
        assert answer.status_code == 201, (url, answer.text)


async def test_the_allow_list_lets_chosen_targets_through(client_for, make_state, hook) -> None:
    port = _port(hook)
    state = make_state(dispatcher={"allow_private_targets": ["localhost", "10.0.0.0/8"]})
    editor = await client_for("beta", "editor", state=state)
    for i, url in enumerate([f"http://localhost:{port}/x", "http://10.9.9.9/", "http://[::ffff:10.1.1.1]/"]):
        answer = await editor.post("/v1/jobs", json=job_body(f"ok-{i}", output={"channel": f"webhook:{url}"}))
        assert answer.status_code == 201, (url, answer.text)
    # a name is not the network it resolves to: 127.0.0.1 itself stays refused
    refused = await editor.post("/v1/jobs", json=job_body("no", output={"channel": f"webhook:http://127.0.0.1:{port}/"}))
    assert refused.status_code == 422, refused.text


async def test_the_dispatcher_checks_again_at_connect(tmp_path, client_for, make_state, engine, database_url,
                                                      fresh_nats, hook) -> None:
    """Accepted while the operator allow-listed `localhost`; the allow-list is then removed.
    The dispatcher resolves the name, finds loopback, and does not connect."""
    port = _port(hook)
    state = make_state(dispatcher={"allow_private_targets": ["localhost"]})
    editor = await client_for("beta", "editor", state=state)
    created = await editor.post("/v1/jobs", json=job_body("hook", output={
        "channel": f"webhook:http://localhost:{port}/internal"}))
    assert created.status_code == 201, created.text
    job = await JobStore(engine).get("beta", "hook")
    ledger = RunReads(engine)

    async def delivery(run_id: str, status: DeliveryStatus):
        run = await ledger.get("beta", run_id)
        return run if run.delivery_status == status else None

    # While allowed, it is delivered, to the address checked, with the name as Host.
    allowed = fast_settings(tmp_path / "allowed", dispatcher={"allow_private_targets": ["localhost"], "timeout_s": 2})
    async with running_node(allowed, fresh_nats.url, database_url) as node:
        run = await SlotLedger(engine).create_manual(job)
        await node.publish_due(run)
        await until(lambda: delivery(run.id, DeliveryStatus.delivered), 30, "the allowed webhook delivered")
    [request] = hook.requests
    assert request.headers["host"] == f"localhost:{port}" and request.path == "/internal"

    strict = fast_settings(tmp_path / "strict")
    async with running_node(strict, fresh_nats.url, database_url) as node:
        run = await SlotLedger(engine).create_manual(job)
        await node.publish_due(run)
        failed = await until(lambda: delivery(run.id, DeliveryStatus.failed), 30, "the refused delivery")
    assert "loopback" in (failed.delivery_error or ""), failed.delivery_error
    assert len(hook.requests) == 1  # nothing more reached the node's own port
