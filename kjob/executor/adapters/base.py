"""The Adapter port: how kjob talks to one kind of agent CLI, beyond starting it.

An adapter says which flags carry the job's budget and the agent's model endpoint, and reads
the agent's stdout, line by line as it streams, into an AgentReport: the final answer, the
agent's verdict, turns, tokens, cost and model. One Stream per attempt; adapters are shared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kjob.model.agent_report import AgentReport, Usage


@dataclass(frozen=True)
class Endpoint:
    """Where the agent's model is: from the registry entry (`base_url`, `model`)."""

    base_url: str | None = None
    model: str | None = None


class Stream:
    """Reads one attempt's stdout. `turns` and `cost_usd` are what is known so far: kjob
    enforces the job's limits on them while the agent runs."""

    turns: int = 0
    cost_usd: float | None = None

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.turns = 0
        self.cost_usd = None

    def line(self, line: str, stream: str = "stdout") -> None:
        """One line of output ("stdout" | "stderr"), without its newline."""

    def report(self, stdout: str) -> AgentReport:
        """The report once the agent ended; `stdout` is all of it (up to the output cap)."""
        return AgentReport(answer=stdout.strip() or None, usage=Usage(model=self.endpoint.model))


class Adapter:
    """The plain adapter: the answer is the agent's whole stdout; nothing else is known."""

    name = "plain"
    #: Budget flags the agent honours itself: limit name -> flag (value appended).
    budget_flags: dict[str, str] = {}

    def argv(self, argv: list[str], endpoint: Endpoint, limits: dict[str, Any]) -> list[str]:
        """The rendered command plus the flags for the endpoint and the limits."""
        extra: list[str] = []
        for limit, flag in self.budget_flags.items():
            if limits.get(limit) is not None:
                extra += [flag, _number(limits[limit])]
        return [*argv, *self.endpoint_flags(endpoint), *extra]

    def endpoint_flags(self, endpoint: Endpoint) -> list[str]:
        return []

    def environment(self, endpoint: Endpoint) -> dict[str, str]:
        return {}

    def stream(self, endpoint: Endpoint) -> Stream:
        return Stream(endpoint)


def _number(value: Any) -> str:
    return str(value)


def json_line(line: str) -> dict[str, Any] | None:
    """The JSON object on one line, or None (banners, warnings and blank lines are skipped)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
