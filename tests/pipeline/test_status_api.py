"""The cluster as `kjob status` shows it, and the run commands of the CLI, against a running node."""

from __future__ import annotations

import asyncio

import httpx

from kjob.store.tokens import TokenStore
from tests.support.pipeline import fast_settings, running_node, until


async def test_status_names_the_node_and_the_leader(tmp_path, fresh_nats, database_url, engine):
    _, secret = await TokenStore(engine).create("default", "viewer")
    async with running_node(fast_settings(tmp_path, node_name="node-a"), fresh_nats.url, database_url) as node:
        async with httpx.AsyncClient(base_url=node.api_url, headers={"Authorization": f"Bearer {secret}"}) as http:
            async def seen():
                body = (await http.get("/v1/status")).json()
                # On a loaded machine a lease renewal can come late and the node step down for a
                # moment; what a user sees is the status settling on one leader, the node itself.
                return body["nodes"] and body["nodes"][0]["leading"] and body["leader"] and body
            body = await until(seen, 15, "the node, leading, and the leader in /v1/status")
            assert (await http.get("/v1/status", headers={"Authorization": "Bearer nope"})).status_code == 401
    assert [n["node"] for n in body["nodes"]] == ["node-a"]
    assert body["nodes"][0]["leading"] is True
    assert sorted(body["nodes"][0]["roles"]) == ["api", "dispatcher", "executor", "ticker"]
    assert body["leader"]["node"] == "node-a" and body["leader"]["lease_age_s"] < 5
    assert body["streams"]["KJOB_RUNS"]["consumer"]["name"] == "kjob-executor"


async def test_cli_run_now_wait_runs_and_logs(tmp_path, fresh_nats, database_url, engine, monkeypatch):
    from typer.testing import CliRunner

    from kjob.cli.main import app
    from tests.support.pipeline import create_job

    _, secret = await TokenStore(engine).create("default", "admin")
    await create_job(engine, slug="probe", prompt="echo probe-ok; echo to-stderr >&2", schedule="@every 1h")
    await create_job(engine, slug="broken", prompt="exit 7", schedule="@every 1h")
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url) as node:
        monkeypatch.setenv("KJOB_API_URL", node.api_url)
        monkeypatch.setenv("KJOB_TOKEN", secret)
        runner = CliRunner()

        def cli(*args):
            return runner.invoke(app, list(args))

        ok = await asyncio.to_thread(cli, "run-now", "probe", "--wait")
        assert ok.exit_code == 0, ok.output
        assert "probe-ok" in ok.output and "succeeded" in ok.output
        bad = await asyncio.to_thread(cli, "run-now", "broken", "--wait")
        assert bad.exit_code == 1 and "failed (exit code 7)" in bad.output
        listed = await asyncio.to_thread(cli, "runs", "probe", "-o", "json")
        import json

        runs = json.loads(listed.output)
        assert [r["status"] for r in runs] == ["succeeded"] and runs[0]["trigger"] == "manual"
        logs = await asyncio.to_thread(cli, "logs", runs[0]["id"])
        assert "probe-ok" in logs.output and "to-stderr" in logs.output
        missing = await asyncio.to_thread(cli, "logs", "no-such-run")
        assert missing.exit_code == 1 and "no run named 'no-such-run'" in missing.output
        nojob = await asyncio.to_thread(cli, "run-now", "nope")
        assert nojob.exit_code == 1 and "nope" in nojob.output


async def test_logs_follow_streams_output_while_the_run_is_running(tmp_path, fresh_nats, database_url, engine):
    from kjob.store.runs import RunReads
    from kjob.store.slots import SlotLedger
    from tests.support.pipeline import create_job

    _, secret = await TokenStore(engine).create("default", "viewer")
    job = await create_job(engine, slug="slow", prompt="echo first; sleep 2; echo second", schedule="@every 1h")
    ledger = RunReads(engine)
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url) as node:
        run = await SlotLedger(engine).create_manual(job)
        await node.publish_due(run)
        seen: list[tuple[str, bool]] = []
        async with httpx.AsyncClient(base_url=node.api_url, headers={"Authorization": f"Bearer {secret}"},
                                     timeout=30) as http:
            await until(lambda: _running(ledger, run.id), 10, "the run to start")
            async with http.stream("GET", f"/v1/runs/{run.id}/logs", params={"follow": "true"}) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_text():
                    final = (await ledger.get("default", run.id)).status.final
                    seen.append((chunk, final))
    text = "".join(c for c, _ in seen)
    assert "first" in text and "second" in text
    first_chunk = next(final for c, final in seen if "first" in c)
    assert first_chunk is False  # "first" arrived live, before the run ended


async def _running(ledger, run_id):
    return (await ledger.get("default", run_id)).status.value == "running"


async def test_status_says_the_bus_is_away_when_nats_is(tmp_path, fresh_nats, engine):
    from kjob.bus.setup import connect
    from kjob.config import Settings
    from kjob.executor.agents import AgentRegistry
    from kjob.gateway.app import create_app
    from kjob.gateway.state import GatewayState
    from kjob.store.jobs import JobStore

    _, secret = await TokenStore(engine).create("default", "viewer")
    nc = await connect(fresh_nats.url, "status-test")
    js = nc.jetstream()
    await nc.close()  # the gateway's bus connection is gone
    state = GatewayState(settings=Settings(home=tmp_path), engine=engine, jobs=JobStore(engine),
                         tokens=TokenStore(engine), agents=AgentRegistry.load(None), relay_configured=False, js=js)
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://kjob",
                                 headers={"Authorization": f"Bearer {secret}"}) as http:
        response = await http.get("/v1/status")
    assert response.status_code == 503
    assert "message bus (NATS)" in response.json()["error"]["message"]
