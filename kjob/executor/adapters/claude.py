"""Claude Code: `claude -p --output-format stream-json --verbose`, the prompt on stdin.

Read from its stream: each `assistant` message is a turn (one model response; several events
of one message count once), the `system/init` event names the model, and the closing `result`
event holds the final answer (`result`), `is_error`, `subtype`, `num_turns`, `total_cost_usd`
and `usage`. `--max-turns` and `--max-budget-usd` carry the job's limits; claude ends with
subtype `error_max_turns` / `error_max_budget_usd` when it reaches one.
"""

from __future__ import annotations

from typing import Any

from kjob.executor.adapters.base import Adapter, Endpoint, Stream, json_line
from kjob.model.agent_report import AgentReport, Usage

_BUDGET_SUBTYPES = {"error_max_turns": "max_turns", "error_max_budget_usd": "max_cost_usd"}


class ClaudeStream(Stream):
    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint)
        self._messages: set[str] = set()
        self._model: str | None = endpoint.model
        self._result: dict[str, Any] | None = None
        self._last_text: str | None = None

    def line(self, line: str, stream: str = "stdout") -> None:
        event = json_line(line) if stream == "stdout" else None
        if event is None:
            return
        kind = event.get("type")
        if kind == "system" and event.get("subtype") == "init" and isinstance(event.get("model"), str):
            self._model = event["model"]
        elif kind == "assistant" and isinstance(event.get("message"), dict):
            message = event["message"]
            self._messages.add(str(message.get("id")))
            self.turns = len(self._messages)
            texts = [b.get("text", "") for b in message.get("content") or [] if isinstance(b, dict) and b.get("type") == "text"]
            if texts:
                self._last_text = "".join(texts)
        elif kind == "result":
            self._result = event
            if isinstance(event.get("total_cost_usd"), (int, float)):
                self.cost_usd = float(event["total_cost_usd"])

    def report(self, stdout: str) -> AgentReport:
        result = self._result
        if result is None:  # it died before its result: keep what it said last
            return AgentReport(answer=self._last_text, usage=Usage(turns=self.turns or None, model=self._model))
        usage = result.get("usage") or {}
        tokens_in = sum(int(usage.get(k) or 0) for k in
                        ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
        models = list((result.get("modelUsage") or {}).keys())
        subtype = str(result.get("subtype") or "")
        failed = bool(result.get("is_error")) or subtype.startswith("error")
        errors = result.get("errors") or []
        answer = result.get("result") if isinstance(result.get("result"), str) else self._last_text
        budget = None
        if subtype in _BUDGET_SUBTYPES:
            budget = "; ".join(map(str, errors)) or f"{_BUDGET_SUBTYPES[subtype]} reached"
        return AgentReport(
            answer=answer,
            verdict="failed" if failed else "success",
            error=("; ".join(map(str, errors)) or answer or subtype) if failed else None,
            usage=Usage(
                tokens_in=tokens_in if usage else None,
                tokens_out=int(usage["output_tokens"]) if "output_tokens" in usage else None,
                cost_usd=self.cost_usd,
                turns=int(result["num_turns"]) if isinstance(result.get("num_turns"), int) else self.turns or None,
                model=self._model or (models[0] if models else None),
            ),
            budget=budget,
        )


class ClaudeAdapter(Adapter):
    name = "claude"
    budget_flags = {"max_turns": "--max-turns", "max_cost_usd": "--max-budget-usd"}

    def endpoint_flags(self, endpoint: Endpoint) -> list[str]:
        return ["--model", endpoint.model] if endpoint.model else []

    def environment(self, endpoint: Endpoint) -> dict[str, str]:
        return {"ANTHROPIC_BASE_URL": endpoint.base_url} if endpoint.base_url else {}

    def stream(self, endpoint: Endpoint) -> Stream:
        return ClaudeStream(endpoint)
