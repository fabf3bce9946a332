"""Agent adapters by name: how kjob reads each kind of agent CLI (see base.Adapter).

A registry entry picks one with `adapter = "<name>"`; the default, `plain`, takes the whole
stdout as the answer. docs/agents.md lists what each reads.
"""

from __future__ import annotations

from kjob.executor.adapters.base import Adapter, Endpoint, Stream
from kjob.executor.adapters.claude import ClaudeAdapter
from kjob.executor.adapters.codex import CodexAdapter
from kjob.executor.adapters.llm import LlmAdapter

ADAPTERS: dict[str, Adapter] = {a.name: a for a in (Adapter(), ClaudeAdapter(), CodexAdapter(), LlmAdapter())}

__all__ = ["ADAPTERS", "Adapter", "Endpoint", "Stream"]
