"""`llm` (Simon Willison's CLI, PyPI `llm`): any OpenAI-compatible endpoint.

`llm prompt --no-log --usage -m <model>`, the prompt on stdin. The answer is its stdout; the
usage line it prints on stderr (`Token usage: 12 input, 34 output`) gives the tokens. The
endpoint comes from $OPENAI_BASE_URL (set from the entry's `base_url`), the key from
$OPENAI_API_KEY. One model call per run: turns = 1; cost from the entry's `price`.
"""

from __future__ import annotations

import re

from kjob.executor.adapters.base import Adapter, Endpoint, Stream
from kjob.model.agent_report import AgentReport, Usage

_USAGE = re.compile(r"^Token usage: ([\d,]+) input, ([\d,]+) output")


class LlmStream(Stream):
    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint)
        self._tokens: tuple[int, int] | None = None

    def line(self, line: str, stream: str = "stdout") -> None:
        if stream == "stderr" and (m := _USAGE.match(line.strip())):
            self._tokens = (int(m.group(1).replace(",", "")), int(m.group(2).replace(",", "")))

    def report(self, stdout: str) -> AgentReport:
        answer = stdout.strip() or None
        tokens_in, tokens_out = self._tokens or (None, None)
        return AgentReport(answer=answer, verdict="success" if answer else None,
                           usage=Usage(tokens_in=tokens_in, tokens_out=tokens_out, turns=1 if answer else None,
                                       model=self.endpoint.model))


class LlmAdapter(Adapter):
    name = "llm"

    def endpoint_flags(self, endpoint: Endpoint) -> list[str]:
        return ["-m", endpoint.model] if endpoint.model else []

    def environment(self, endpoint: Endpoint) -> dict[str, str]:
        return {"OPENAI_BASE_URL": endpoint.base_url} if endpoint.base_url else {}

    def stream(self, endpoint: Endpoint) -> Stream:
        return LlmStream(endpoint)
