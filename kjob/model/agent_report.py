"""What an agent said about its run: its answer, its verdict and its usage. Pure.

Two sources feed it: the agent's adapter, which reads the agent's own output format
(kjob.executor.adapters), and the result protocol, a JSON file any agent may write at
`$KJOB_RESULT` (docs/agents.md). What the file says wins, field by field, because the agent
wrote it on purpose.

The result file, every key optional:

    {"status": "success" | "failed",      the agent's verdict
     "summary": "one line",               the Relay title's detail
     "body": "the answer",                what Relay gets (else the agent's final answer)
     "tokens": {"input": 1200, "output": 300},
     "cost_usd": 0.0123,
     "turns": 3, "model": "...",
     "notify": true | false}              send this run or not, whatever the notify policy
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Verdict = Literal["success", "failed"]

#: Largest result file kjob reads; the answer is truncated for Relay anyway.
MAX_RESULT_BYTES = 256 * 1024
#: The answer kept in the ledger per attempt (Relay's body is shorter still).
MAX_ANSWER_CHARS = 64 * 1024


class BadResult(ValueError):
    """The result file is not what the protocol says; the message says what is wrong."""


@dataclass(frozen=True)
class Usage:
    tokens_in: int | None = None
    tokens_out: int | None = None
    cost_usd: float | None = None
    turns: int | None = None
    model: str | None = None

    def merged(self, other: "Usage") -> "Usage":
        """`other`'s figures where it has them, ours elsewhere."""
        return Usage(**{k: (getattr(other, k) if getattr(other, k) is not None else getattr(self, k))
                        for k in ("tokens_in", "tokens_out", "cost_usd", "turns", "model")})

    @property
    def empty(self) -> bool:
        return all(getattr(self, k) is None for k in ("tokens_in", "tokens_out", "cost_usd", "turns", "model"))


@dataclass(frozen=True)
class Price:
    """USD per million tokens, for agents that report tokens but no cost (codex, llm)."""

    input: float
    output: float

    def cost(self, tokens_in: int | None, tokens_out: int | None) -> float | None:
        if tokens_in is None and tokens_out is None:
            return None
        return ((tokens_in or 0) * self.input + (tokens_out or 0) * self.output) / 1_000_000


@dataclass(frozen=True)
class AgentReport:
    #: The final answer, as the agent gave it to its user; None: the adapter found none.
    answer: str | None = None
    verdict: Verdict | None = None
    #: Why the agent says it failed (its error message); None when it did not say.
    error: str | None = None
    summary: str | None = None
    usage: Usage = field(default_factory=Usage)
    #: The agent's own word on sending this run (result file); None: the notify policy decides.
    notify: bool | None = None
    #: The agent stopped itself at a budget kjob passed it (e.g. "max_turns 3 reached").
    budget: str | None = None

    def merged(self, other: "AgentReport") -> "AgentReport":
        """`other` (the result file) over this one (the adapter), field by field."""
        return AgentReport(
            answer=other.answer if other.answer is not None else self.answer,
            verdict=other.verdict or self.verdict,
            error=other.error or self.error,
            summary=other.summary or self.summary,
            usage=self.usage.merged(other.usage),
            notify=other.notify if other.notify is not None else self.notify,
            budget=other.budget or self.budget,
        )

    def priced(self, price: Price | None) -> "AgentReport":
        """With a cost computed from tokens when the agent reported none."""
        if price is None or self.usage.cost_usd is not None:
            return self
        return replace(self, usage=replace(self.usage, cost_usd=price.cost(self.usage.tokens_in, self.usage.tokens_out)))


def parse_result_file(raw: bytes) -> AgentReport:
    """The report in a `$KJOB_RESULT` file.

    :raises BadResult: not JSON, not an object, too large, or a key of the wrong type.
    """
    if len(raw) > MAX_RESULT_BYTES:
        raise BadResult(f"the result file is {len(raw)} bytes; the limit is {MAX_RESULT_BYTES}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadResult(f"the result file is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadResult("the result file must hold a JSON object")
    known = {"status", "summary", "body", "tokens", "cost_usd", "turns", "model", "notify"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BadResult(f"unknown key {unknown[0]!r} in the result file; the keys are {', '.join(sorted(known))}")
    status = data.get("status")
    if status is not None and status not in ("success", "failed"):
        raise BadResult(f"status must be \"success\" or \"failed\", not {status!r}")
    tokens = data.get("tokens") or {}
    if not isinstance(tokens, dict) or set(tokens) - {"input", "output"}:
        raise BadResult('tokens must be an object like {"input": 1200, "output": 300}')
    usage = Usage(
        tokens_in=_count(tokens.get("input"), "tokens.input"),
        tokens_out=_count(tokens.get("output"), "tokens.output"),
        cost_usd=_cost(data.get("cost_usd")),
        turns=_count(data.get("turns"), "turns"),
        model=_text(data.get("model"), "model", 200),
    )
    notify = data.get("notify")
    if notify is not None and not isinstance(notify, bool):
        raise BadResult("notify must be true or false")
    return AgentReport(
        answer=_text(data.get("body"), "body", MAX_ANSWER_CHARS),
        verdict=status,
        summary=_text(data.get("summary"), "summary", 500),
        usage=usage,
        notify=notify,
    )


def _count(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadResult(f"{name} must be a whole number >= 0")
    return value


def _cost(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BadResult("cost_usd must be a number >= 0")
    return float(value)


def _text(value: Any, name: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadResult(f"{name} must be a string")
    return value[:limit]


def verdict_status(status: Any, reason: str | None, report: AgentReport, budget_stop: str | None,
                   result_error: str | None) -> tuple[Any, str | None]:
    """The attempt's status once the agent's own word is heard (a RunStatus and its reason).

    kjob stopping the agent at a budget, or the agent stopping itself at one, is
    `budget_exceeded`; an agent that reports a failure is `failed` even when it exits 0. A
    non-zero exit stays a failure whatever the agent says (invariant 6)."""
    from kjob.model.run import RunStatus  # run.py imports job.py; keep this module's imports light

    if budget_stop or report.budget:
        return RunStatus.budget_exceeded, budget_stop or report.budget
    if status is RunStatus.succeeded and report.verdict == "failed":
        return RunStatus.failed, f"the agent reported a failure: {(report.error or 'no detail')[:500]}"
    if status is RunStatus.succeeded and result_error:
        return status, result_error
    return status, reason
