"""OpenAI Codex: `codex exec --json`, the prompt on stdin.

Read from its JSONL events: `item.completed` of type `agent_message` is an answer (the last one
is the final answer); each tool item started (`command_execution`, `mcp_tool_call`,
`web_search`, `file_change`) is a model response asking for a tool, so turns = tool calls + the
answering response; `turn.completed` carries `usage` (input and output tokens); `turn.failed`
and `error` events mean the agent failed. Codex reports no cost: the registry's `price` turns
its tokens into one. It has no budget flags, so kjob enforces `max_turns` from the stream.

With a `base_url`, the endpoint is a provider named `kjob` set up with `-c` flags (Responses
API, key from $OPENAI_API_KEY).
"""

from __future__ import annotations

from kjob.executor.adapters.base import Adapter, Endpoint, Stream, json_line
from kjob.model.agent_report import AgentReport, Usage

_TOOL_ITEMS = frozenset({"command_execution", "mcp_tool_call", "web_search", "file_change"})


class CodexStream(Stream):
    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint)
        self._tools = 0
        self._answer: str | None = None
        self._error: str | None = None
        self._tokens_in: int | None = None
        self._tokens_out: int | None = None

    def line(self, line: str, stream: str = "stdout") -> None:
        event = json_line(line) if stream == "stdout" else None
        if event is None:
            return
        kind = event.get("type")
        item = event.get("item") if isinstance(event.get("item"), dict) else {}
        if kind == "item.started" and item.get("type") in _TOOL_ITEMS:
            self._tools += 1
        elif kind == "item.completed" and item.get("type") == "agent_message" and isinstance(item.get("text"), str):
            self._answer = item["text"]
        elif kind == "turn.completed" and isinstance(event.get("usage"), dict):
            usage = event["usage"]
            self._tokens_in = (self._tokens_in or 0) + int(usage.get("input_tokens") or 0)
            self._tokens_out = (self._tokens_out or 0) + int(usage.get("output_tokens") or 0)
        elif kind == "turn.failed":
            self._error = str((event.get("error") or {}).get("message") or "the turn failed")
        elif kind == "error":
            self._error = str(event.get("message") or "codex reported an error")
        self.turns = self._tools + (1 if self._answer is not None else 0)

    def report(self, stdout: str) -> AgentReport:
        failed = self._error is not None
        return AgentReport(
            answer=self._answer,
            verdict="failed" if failed else ("success" if self._answer is not None else None),
            error=self._error,
            usage=Usage(tokens_in=self._tokens_in, tokens_out=self._tokens_out, turns=self.turns or None,
                        model=self.endpoint.model),
        )


class CodexAdapter(Adapter):
    name = "codex"

    def endpoint_flags(self, endpoint: Endpoint) -> list[str]:
        flags = ["-m", endpoint.model] if endpoint.model else []
        if endpoint.base_url:
            flags += ["-c", "model_provider=kjob", "-c", "model_providers.kjob.name=kjob",
                      "-c", f"model_providers.kjob.base_url={endpoint.base_url}",
                      "-c", "model_providers.kjob.env_key=OPENAI_API_KEY",
                      "-c", "model_providers.kjob.wire_api=responses"]
        return flags

    def stream(self, endpoint: Endpoint) -> Stream:
        return CodexStream(endpoint)
