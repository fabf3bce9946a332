"""Real agent CLIs end to end: a job with agent = "claude" or "codex" runs the real CLI in the
process sandbox against a scripted model API on loopback; Relay gets the agent's answer, the
ledger its tokens and cost; budgets stop agents; notify = on_change stays silent on repeats."""

from __future__ import annotations

import subprocess

import httpx

from sqlalchemy import select

from kjob.config import QuotaSettings
from kjob.model.run import DeliveryStatus, MissReason, RunStatus
from kjob.store.runs import RunReads
from kjob.store.slots import SlotLedger
from kjob.store.tables import run_usage
from kjob.store.tokens import TokenStore
from kjob.store.secrets import SecretBox, SecretStore, generate_key
from tests.support.modelapi import Reply
from tests.support.pipeline import ACTOR, create_job, fast_settings, running_node, runs_of, until
from tests.support.relay import RecordingRelay

#: The model's answer must reach the loopback server: no network namespace of its own.
NET = {"network": "host", "env": {"ANTHROPIC_API_KEY": "sk-test", "OPENAI_API_KEY": "sk-test"}}


def agent_settings(tmp_path, relay_url, agents_file, **more):
    """The CLIs live outside the sandbox's system dirs: the operator shares their directories
    (executor.extra_binds); the model API is on loopback: the tenant may use the host network."""
    import sysconfig
    from pathlib import Path
    settings = fast_settings(tmp_path, relay_url=relay_url, **more)
    settings.executor.agents_file = agents_file
    settings.executor.extra_binds = [Path(__file__).resolve().parents[2] / ".ci" / "agents",
                                     Path(sysconfig.get_path("scripts")).parent]
    settings.executor.host_network_tenants = ["default"]
    return settings


async def _run_once(node, engine, job, timeout=60):
    run = await SlotLedger(engine).create_manual(job)
    await node.publish_due(run)

    async def done():
        [r] = [r for r in await runs_of(engine, job) if r.id == run.id]
        return r if r.status.final and r.delivery_status is not DeliveryStatus.pending else None
    return await until(done, timeout, f"run {run.id} of {job.slug} final and dispatched")


async def _usage(engine, run_id):
    async with engine.connect() as conn:
        return (await conn.execute(select(run_usage).where(run_usage.c.run_id == run_id))).one()


async def test_claude_and_codex_answers_reach_relay_with_their_usage_in_the_ledger(
        tmp_path, fresh_nats, database_url, engine, model_api, agents_file):
    model_api.script(Reply.answer("Claude: the build is green.", input_tokens=1234, output_tokens=56))
    with RecordingRelay() as relay:
        settings = agent_settings(tmp_path, relay.url, agents_file)
        claude = await create_job(engine, slug="claude-job", agent="claude", prompt="is the build green?",
                                  schedule="@every 1h", sandbox=NET, output={"channel": "ops"})
        codex = await create_job(engine, slug="codex-job", agent="codex", prompt="is the build green?",
                                 schedule="@every 1h", sandbox=NET, output={"channel": "ops"})
        async with running_node(settings, fresh_nats.url, database_url) as node:
            c_run = await _run_once(node, engine, claude)
            model_api.script(Reply.answer("Codex: all 212 tests pass.", input_tokens=4000, output_tokens=100))
            x_run = await _run_once(node, engine, codex)
        bodies = {q.idempotency_key: q.json["message"] for q in relay.accepted}
    assert c_run.status is RunStatus.succeeded and x_run.status is RunStatus.succeeded, (c_run, x_run)
    # what the user sees in chat: the answer, not the agent's JSON stream
    assert bodies[c_run.id]["body"].split("\n\nFull log:")[0] == "Claude: the build is green."
    assert bodies[x_run.id]["body"].split("\n\nFull log:")[0] == "Codex: all 212 tests pass."
    assert bodies[c_run.id]["title"] == "[claude-job] completed"
    cu, xu = await _usage(engine, c_run.id), await _usage(engine, x_run.id)
    assert (cu.tokens_in, cu.tokens_out, cu.turns) == (1234, 56, 1)
    assert cu.cost_usd and cu.cost_usd > 0 and cu.model  # claude's own figure
    assert (xu.tokens_in, xu.tokens_out, xu.turns, xu.model) == (4000, 100, 1, "gpt-5-codex")
    assert abs(xu.cost_usd - (4000 * 1.25 + 100 * 10.0) / 1e6) < 1e-9  # priced from the entry's `price`
    # both CLIs really talked to the model API, with the job's prompt
    assert "is the build green?" in str(model_api.calls("/v1/messages")[0].body)
    assert "is the build green?" in str(model_api.calls("/v1/responses")[0].body)


async def test_budgets_stop_both_agents_with_the_figure(tmp_path, fresh_nats, database_url, engine, model_api,
                                                        agents_file):
    # the model never stops asking for tools: only a budget ends the run
    model_api.default = Reply.call("Bash", {"command": "echo hi", "description": "hi"})
    with RecordingRelay() as relay:
        settings = agent_settings(tmp_path, relay.url, agents_file)
        claude = await create_job(engine, slug="claude-loop", agent="claude", prompt="loop", schedule="@every 1h",
                                  sandbox=NET, output={"channel": "ops"}, limits={"max_turns": 2})
        codex = await create_job(engine, slug="codex-loop", agent="codex", prompt="loop", schedule="@every 1h",
                                 sandbox=NET, output={"channel": "ops"}, limits={"max_turns": 2})
        spender = await create_job(engine, slug="claude-spend", agent="claude", prompt="loop", schedule="@every 1h",
                                   sandbox=NET, output={"channel": "ops"}, limits={"max_cost_usd": 0.03})
        async with running_node(settings, fresh_nats.url, database_url) as node:
            c_run = await _run_once(node, engine, claude)
            claude_calls = len(model_api.calls("/v1/messages"))
            model_api.default = Reply.call("Bash", {"command": "echo hi", "description": "hi"},
                                           input_tokens=1000, output_tokens=100)
            s_run = await _run_once(node, engine, spender)
            model_api.default = Reply.call("exec_command", {"cmd": "echo hi"})
            x_run = await _run_once(node, engine, codex)
            codex_calls = len(model_api.calls("/v1/responses"))
        titles = {q.idempotency_key: q.json["message"] for q in relay.accepted}
    assert c_run.status is RunStatus.budget_exceeded and "maximum number of turns (2)" in c_run.reason, c_run
    assert claude_calls == 2  # claude honoured --max-turns itself
    assert s_run.status is RunStatus.budget_exceeded and "maximum budget ($0.03)" in s_run.reason, s_run
    assert (await _usage(engine, s_run.id)).cost_usd >= 0.03  # what it spent is in the ledger
    assert x_run.status is RunStatus.budget_exceeded and "over max_turns 2" in x_run.reason, x_run
    assert 3 <= codex_calls <= 5  # kjob stopped codex at its third tool call, not the model's 600th
    log, _, _ = await RunReads(engine).log("default", x_run.id)
    assert log.count("command_execution") >= 3  # the stopped agent's output is kept for its log
    assert c_run.attempt == 1 and x_run.attempt == 1  # no retry spends the budget again
    assert titles[x_run.id]["status"] == "failed"


async def test_on_change_sends_a_changed_answer_only_and_the_quiet_marker_never(
        tmp_path, fresh_nats, database_url, engine, model_api, agents_file):
    with RecordingRelay() as relay:
        settings = agent_settings(tmp_path, relay.url, agents_file)
        job = await create_job(engine, slug="watch", agent="claude", prompt="anything new?", schedule="@every 1h",
                               sandbox=NET, output={"channel": "ops", "notify": "on_change"})
        async with running_node(settings, fresh_nats.url, database_url) as node:
            runs = []
            for answer in ("3 open incidents", "3 open  incidents\n", "2 open incidents", "NO_REPLY"):
                model_api.script(Reply.answer(answer))
                runs.append(await _run_once(node, engine, job))
        sent = [q.json["message"]["body"].split("\n\nFull log:")[0] for q in relay.accepted]
    assert sent == ["3 open incidents", "2 open incidents"]
    first, same, changed, quiet = runs
    assert same.delivery_status is DeliveryStatus.suppressed and f"unchanged since run {first.id}" in same.delivery_error
    assert changed.delivery_status is DeliveryStatus.delivered
    assert quiet.delivery_status is DeliveryStatus.suppressed and "quiet marker" in quiet.delivery_error
    assert all(r.status is RunStatus.succeeded for r in runs)


async def test_workspace_is_a_fresh_clone_and_the_shell_agent_reports_through_kjob_result(
        tmp_path, fresh_nats, database_url, engine):
    bare = tmp_path / "repo.git"
    src = tmp_path / "src"
    git = lambda *a, cwd=None: subprocess.run(["git", *a], cwd=cwd, check=True, capture_output=True)  # noqa: E731
    git("init", "--bare", "-b", "main", str(bare))
    git("clone", str(bare), str(src))
    (src / "README").write_text("v1\n")
    git("-c", "user.email=t@t", "-c", "user.name=t", "add", "README", cwd=src)
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-m", "v1", cwd=src)
    git("push", "origin", "main", cwd=src)
    script = (
        'test -z "$(git status --porcelain)" || exit 9; echo dirty >> README; '
        'printf \'{"status":"success","body":"README says %s","tokens":{"input":7,"output":3},"cost_usd":0.25}\' '
        '"$(head -1 README)" > "$KJOB_RESULT"; echo chatter that is not the answer'
    )
    with RecordingRelay() as relay:
        settings = fast_settings(tmp_path, relay_url=relay.url)
        settings.executor.workspace_roots = [tmp_path]
        job = await create_job(engine, slug="ws", prompt=script, schedule="@every 1h",
                               workspace={"git": str(bare), "ref": "main"}, output={"channel": "ops"})
        async with running_node(settings, fresh_nats.url, database_url) as node:
            first = await _run_once(node, engine, job)
            (src / "README").write_text("v2\n")
            git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-am", "v2", cwd=src)
            git("push", "origin", "main", cwd=src)
            second = await _run_once(node, engine, job)
        sent = [q.json["message"]["body"].split("\n\nFull log:")[0] for q in relay.accepted]
    # each run starts from a clean clone of the branch as it is now (the first run's edit is gone)
    assert first.status is RunStatus.succeeded and second.status is RunStatus.succeeded, (first, second)
    assert sent == ["README says v1", "README says v2"]
    usage = await _usage(engine, second.id)
    assert (usage.tokens_in, usage.tokens_out, usage.cost_usd) == (7, 3, 0.25)


async def test_a_workspace_outside_the_allowed_roots_is_refused(tmp_path, fresh_nats, database_url, engine):
    settings = fast_settings(tmp_path)
    job = await create_job(engine, slug="ws-no", prompt="true", schedule="@every 1h",
                           workspace={"git": "/etc", "ref": "main"})
    async with running_node(settings, fresh_nats.url, database_url) as node:
        run = await _run_once(node, engine, job, timeout=20)
    assert run.status is RunStatus.error and "outside executor.workspace_roots" in run.reason


async def test_llm_against_an_openai_compatible_endpoint_with_its_key_from_a_secret(
        tmp_path, fresh_nats, database_url, engine, model_api, agents_file):
    key = generate_key()
    await SecretStore(engine, SecretBox(key)).set(ACTOR, "openai", "sk-from-the-secret-store")
    model_api.script(Reply.answer("Disk usage is at 71%.", input_tokens=300, output_tokens=12))
    with RecordingRelay() as relay:
        settings = agent_settings(tmp_path, relay.url, agents_file, secret_key=key)
        job = await create_job(engine, slug="llm-job", agent="llm", prompt="how full is the disk?",
                               schedule="@every 1h", output={"channel": "ops"},
                               sandbox={"network": "host", "env": {"OPENAI_API_KEY": "secret:openai"}})
        async with running_node(settings, fresh_nats.url, database_url) as node:
            run = await _run_once(node, engine, job)
        [body] = [q.json["message"]["body"].split("\n\nFull log:")[0] for q in relay.accepted]
    assert run.status is RunStatus.succeeded and body == "Disk usage is at 71%."
    [call] = model_api.calls("/v1/chat/completions")
    assert call.headers["authorization"] == "Bearer sk-from-the-secret-store"
    assert call.body["messages"][-1]["content"] == "how full is the disk?"
    usage = await _usage(engine, run.id)
    assert (usage.tokens_in, usage.tokens_out, usage.turns, usage.model) == (300, 12, 1, "gpt-4o-mini")
    assert abs(usage.cost_usd - (300 * 0.15 + 12 * 0.6) / 1e6) < 1e-12


async def test_an_agent_that_reports_failure_fails_even_when_it_exits_0(tmp_path, fresh_nats, database_url, engine):
    script = ('echo \'{"status":"failed","body":"the deploy is broken","cost_usd":0.5,"turns":2}\' > "$KJOB_RESULT"; '
              'echo noise; exit 0')
    with RecordingRelay() as relay:
        settings = fast_settings(tmp_path, relay_url=relay.url)
        job = await create_job(engine, slug="says-failed", prompt=script, schedule="@every 1h",
                               output={"channel": "ops", "notify": "on_failure"})
        _, secret = await TokenStore(engine).create("default", "viewer")
        async with running_node(settings, fresh_nats.url, database_url) as node:
            run = await _run_once(node, engine, job)
            async with httpx.AsyncClient(base_url=node.api_url, headers={"Authorization": f"Bearer {secret}"}) as http:
                [listed] = (await http.get("/v1/jobs/says-failed/runs")).json()
                one = (await http.get(f"/v1/runs/{run.id}")).json()
                week = (await http.get("/v1/jobs/says-failed")).json()["usage_7d"]
            async with httpx.AsyncClient(base_url=node.api_url, follow_redirects=True) as browser:
                page = (await browser.get(f"/ui/runs/{run.id}?token={secret}")).text
        [message] = [q.json["message"] for q in relay.accepted]
    assert run.status is RunStatus.failed and run.exit_code == 0 and "reported a failure" in run.reason
    assert message["status"] == "failed" and message["body"].startswith("the deploy is broken\n\nFull log:")
    # the API (and so `kjob runs -o json`, `kjob inspect`) shows what the run cost
    assert listed["usage"] == one["usage"] == {"agent": "shell", "model": None, "tokens_in": None, "tokens_out": None,
                                               "cost_usd": 0.5, "turns": 2}
    assert (week["days"], week["attempts"], week["cost_usd"], week["turns"]) == (7, 1, 0.5, 2)
    # and so does the dashboard, whose Relay preview is the answer, not the output
    assert "Agent usage" in page and "$0.5000" in page and "the deploy is broken" in page


async def test_the_tenant_daily_cost_cap_skips_runs_with_one_alert(tmp_path, fresh_nats, database_url, engine):
    script = 'echo \'{"body":"spent","cost_usd":0.5}\' > "$KJOB_RESULT"'
    with RecordingRelay() as relay:
        settings = fast_settings(tmp_path, relay_url=relay.url, quotas=QuotaSettings(max_cost_usd_per_day=0.4))
        job = await create_job(engine, slug="spender", prompt=script, schedule="@every 1h", output={"channel": "ops"})
        _, secret = await TokenStore(engine).create("default", "viewer")
        async with running_node(settings, fresh_nats.url, database_url) as node:
            runs = [await _run_once(node, engine, job) for _ in range(3)]
            async with httpx.AsyncClient(base_url=node.api_url, headers={"Authorization": f"Bearer {secret}"}) as http:
                quota = (await http.get("/v1/quotas")).json()
                shown = (await http.get(f"/v1/runs/{runs[1].id}")).json()
        sent = [q.json["message"] for q in relay.accepted]
    assert (quota["limits"]["max_cost_usd_per_day"], quota["usage"]["cost_usd_today"]) == (0.4, 0.5)
    ran, capped, capped_again = runs
    assert ran.status is RunStatus.succeeded
    assert capped.status is RunStatus.skipped and "daily cost cap of $0.4 is reached ($0.50 spent" in capped.reason
    assert capped.reason_code is MissReason.cost_cap and ran.reason_code is None
    assert (shown["status"], shown["reason"], shown["reason_code"]) == ("skipped", capped.reason, "cost_cap")
    assert capped_again.status is RunStatus.skipped and capped_again.delivery_status is DeliveryStatus.suppressed
    assert [m["body"].split("\n\nFull log:")[0] for m in sent] == ["spent", capped.reason]
    assert sent[1]["title"] == "[spender] skipped"
