"""Reading agents without servers: adapters over recorded output shapes, the result file,
the notify rule, the final status, and registry entries that are refused."""

from __future__ import annotations

import json

import pytest

from kjob.errors import InvalidInput
from kjob.executor.adapters import ADAPTERS, Endpoint
from kjob.executor.agents import parse_agents
from kjob.model.agent_report import AgentReport, BadResult, Price, Usage, parse_result_file, verdict_status
from kjob.model.notify import answer_hash, decide
from kjob.model.run import RunStatus


def _feed(adapter: str, lines: list[dict | str], endpoint: Endpoint = Endpoint()):
    stream = ADAPTERS[adapter].stream(endpoint)
    for line in lines:
        stream.line(line if isinstance(line, str) else json.dumps(line))
    return stream, stream.report("")


def test_claude_error_result_is_a_failed_verdict_with_its_message():
    _, report = _feed("claude", [
        {"type": "system", "subtype": "init", "model": "claude-x"},
        "not json at all",
        {"type": "assistant", "message": {"id": "m1", "content": [{"type": "text", "text": "partial"}]}},
        {"type": "result", "subtype": "success", "is_error": True, "result": "API Error: 401 invalid x-api-key",
         "total_cost_usd": 0, "usage": {"input_tokens": 3, "output_tokens": 0}, "num_turns": 1},
    ])
    assert report.verdict == "failed" and "401" in report.error and report.usage.model == "claude-x"
    status, reason = verdict_status(RunStatus.succeeded, None, report, None, None)
    assert status is RunStatus.failed and "401" in reason  # exit 0 is not success when the agent says so


def test_claude_counts_a_message_once_however_many_events_it_takes():
    stream, report = _feed("claude", [
        {"type": "assistant", "message": {"id": "m1", "content": [{"type": "tool_use"}]}},
        {"type": "assistant", "message": {"id": "m1", "content": [{"type": "text", "text": "a"}]}},
        {"type": "assistant", "message": {"id": "m2", "content": [{"type": "text", "text": "b"}]}},
    ])
    assert stream.turns == 2 and report.answer == "b"  # no result event: the last text stands


def test_codex_counts_tool_calls_and_sums_usage_over_turns():
    stream, report = _feed("codex", [
        {"type": "item.started", "item": {"type": "command_execution"}},
        {"type": "item.started", "item": {"type": "reasoning"}},
        {"type": "item.completed", "item": {"type": "agent_message", "text": "first"}},
        {"type": "turn.completed", "usage": {"input_tokens": 10, "output_tokens": 2}},
        {"type": "item.completed", "item": {"type": "agent_message", "text": "final"}},
        {"type": "turn.completed", "usage": {"input_tokens": 5, "output_tokens": 1}},
    ], Endpoint(model="m"))
    assert (report.answer, report.verdict, stream.turns) == ("final", "success", 2)
    assert (report.usage.tokens_in, report.usage.tokens_out, report.usage.model) == (15, 3, "m")
    _, failed = _feed("codex", [{"type": "turn.failed", "error": {"message": "stream disconnected"}}])
    assert failed.verdict == "failed" and failed.error == "stream disconnected"


def test_result_file_overrides_the_adapter_field_by_field_and_prices_from_tokens():
    adapter = AgentReport(answer="raw", verdict="success", usage=Usage(tokens_in=1, turns=4, model="m"))
    file = parse_result_file(b'{"body": "the answer", "tokens": {"input": 1000000, "output": 0}}')
    merged = adapter.merged(file).priced(Price(input=2.0, output=8.0))
    assert (merged.answer, merged.verdict, merged.usage.tokens_in, merged.usage.turns) == ("the answer", "success", 1000000, 4)
    assert merged.usage.cost_usd == 2.0


@pytest.mark.parametrize("raw,words", [
    (b"not json", "not JSON"),
    (b"[1]", "object"),
    (b'{"status": "ok"}', "status"),
    (b'{"tokens": 5}', "tokens"),
    (b'{"tokens": {"input": -1}}', "tokens.input"),
    (b'{"cost_usd": "1"}', "cost_usd"),
    (b'{"cost_usd": NaN}', "cost_usd"),
    (b'{"notify": "yes"}', "notify"),
    (b'{"colour": 1}', "colour"),
    (b"{" + b" " * 300_000 + b"}", "limit"),
])
def test_bad_result_files_are_refused_saying_what_is_wrong(raw, words):
    with pytest.raises(BadResult, match=words):
        parse_result_file(raw)


def test_budget_wins_over_everything_and_is_never_retried():
    status, reason = verdict_status(RunStatus.failed, "exit code 1", AgentReport(), "stopped after 3 turns", None)
    assert status is RunStatus.budget_exceeded and reason == "stopped after 3 turns"
    status, _ = verdict_status(RunStatus.failed, "x", AgentReport(budget="Reached maximum number of turns (2)"), None, None)
    assert status is RunStatus.budget_exceeded and status.final


def test_notify_rules():
    kw = dict(quiet="NO_REPLY", agent_notify=None, last_sent_hash=answer_hash("a  b\n"), last_sent_run="r1")
    assert not decide(policy="on_change", succeeded=True, answer="a b", **kw).send
    assert decide(policy="on_change", succeeded=True, answer="a c", **kw).send
    assert decide(policy="on_change", succeeded=False, answer="a b", **kw).send  # a failure is news
    assert not decide(policy="on_failure", succeeded=True, answer="x", **kw).send
    assert not decide(policy="always", succeeded=True, answer=" NO_REPLY\n", **kw).send
    assert not decide(policy="always", succeeded=True, answer="x", **{**kw, "agent_notify": False}).send
    assert decide(policy="never", succeeded=True, answer="x", **{**kw, "agent_notify": True}).send


@pytest.mark.parametrize("entry,words", [
    ('command = ["x"]\nadapter = "gpt"', "adapter must be one of"),
    ('command = ["x"]\nbase_url = "localhost:8000"', "base_url"),
    ('command = ["x"]\nprice = { input = 1 }', "price"),
    ('command = ["x"]\nprice = { input = -1, output = 1 }', "price"),
    ('command = ["x"]\nmodel = ""', "model"),
])
def test_bad_registry_entries_are_refused(entry, words):
    with pytest.raises(InvalidInput, match=words) as err:
        parse_agents(f"[agents.a]\n{entry}\n", "agents.toml")
    assert err.value.field == "executor.agents_file"


def test_limits_become_claude_flags_and_the_endpoint_its_environment():
    [agent] = parse_agents('[agents.c]\ncommand = ["claude", "-p"]\nadapter = "claude"\n'
                           'base_url = "http://127.0.0.1:9"\nmodel = "opus"\n', "f")
    argv, _, env = agent.render(prompt="p", run_id="r", slug="s", tenant="t", attempt=1,
                                limits={"max_turns": 5, "max_cost_usd": 0.5})
    assert argv == ["claude", "-p", "--model", "opus", "--max-turns", "5", "--max-budget-usd", "0.5"]
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9"
