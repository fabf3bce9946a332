"""The agent registry: which program runs a job's prompt, and how the prompt reaches it.

A job names an agent (`agent = "kode"`); the executor looks it up here and renders it into an
argv list, optional stdin bytes and environment variables for the sandbox. Nothing is ever
passed through a shell, so a prompt holding quotes, `$(...)` or `;` reaches the agent as the
literal text the user wrote.

Registry sources, later ones replacing earlier ones by name (a whole entry, never a merge):

1. the built-in `shell` agent;
2. the packaged `kjob/agents.toml` (`kode`, `kortex`);
3. the user's file, named by `settings.executor.agents_file` (`KJOB_EXECUTOR__AGENTS_FILE`).

A registered agent whose binary is missing on a node is not a registry error: the attempt ends
with status `error`, because another node (or a docker image) may well have it.
"""

from __future__ import annotations

import re
import string
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Literal, get_args

from kjob.errors import InvalidInput
from kjob.executor.adapters import ADAPTERS, Adapter, Endpoint
from kjob.model.agent_report import Price
from kjob.model.job import ENV_NAME_PATTERN

PromptMode = Literal["arg", "stdin", "env"]
PROMPT_MODES: tuple[str, ...] = get_args(PromptMode)

#: The placeholders a command template may hold. `{prompt}` only when prompt = "arg".
PLACEHOLDERS = ("prompt", "run_id", "slug", "tenant", "attempt")

#: Agent names, as a job may spell them.
AGENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"

#: What every rendered agent gets in its environment; an agent's own `env` cannot set these.
RESERVED_ENV = ("KJOB_PROMPT", "KJOB_RUN_ID", "KJOB_JOB", "KJOB_TENANT", "KJOB_ATTEMPT")

_AGENT_KEYS = ("command", "prompt", "env", "description", "adapter", "base_url", "model", "price")
_SETTING = "executor.agents_file"


@dataclass(frozen=True, kw_only=True)
class Agent:
    """One runnable agent. Constructing it checks it: a bad agent raises InvalidInput whose
    field is the agent's key at fault (`command`, `prompt`, `env`, `name`)."""

    name: str
    #: argv template; each element may hold placeholders from PLACEHOLDERS (`{{`/`}}` for braces)
    command: tuple[str, ...]
    #: how the prompt reaches the agent: as `{prompt}` in argv, on stdin, or as $KJOB_PROMPT
    prompt: PromptMode = "stdin"
    #: extra environment, literal (no placeholders)
    env: dict[str, str] = field(default_factory=dict)
    description: str = ""
    #: how kjob reads the agent's output and passes it budgets (kjob.executor.adapters)
    adapter: str = "plain"
    #: the model endpoint and model the adapter points the agent at (None: the agent's default)
    base_url: str | None = None
    model: str | None = None
    #: USD per million tokens, for agents that report tokens but no cost
    price: Price | None = None

    def __post_init__(self) -> None:
        # Accept a list for convenience; keep a tuple so a frozen Agent really cannot change.
        object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(self, "env", dict(self.env))
        _check(self)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(base_url=self.base_url, model=self.model)

    @property
    def reader(self) -> Adapter:
        return ADAPTERS[self.adapter]

    def render(
        self, *, prompt: str, run_id: str, slug: str, tenant: str, attempt: int, limits: dict[str, Any] | None = None
    ) -> tuple[list[str], bytes | None, dict[str, str]]:
        """(argv, stdin, env) for one attempt. Values are inserted verbatim: a prompt holding
        `{run_id}` or `$(...)` stays that text.

        :raises InvalidInput: (field `prompt`) the prompt holds a NUL byte, which neither argv
            nor the environment can carry.
        """
        if "\x00" in prompt and self.prompt != "stdin":
            raise InvalidInput(
                "the prompt holds a NUL byte, which no program argument or environment variable can carry",
                "prompt",
            )
        values = {"prompt": prompt, "run_id": run_id, "slug": slug, "tenant": tenant, "attempt": str(attempt)}
        # str.format substitutes values without re-reading them, so braces in a value stay literal.
        argv = self.reader.argv([part.format_map(values) for part in self.command], self.endpoint, limits or {})
        env = {
            **self.reader.environment(self.endpoint),
            **self.env,
            "KJOB_RUN_ID": run_id,
            "KJOB_JOB": slug,
            "KJOB_TENANT": tenant,
            "KJOB_ATTEMPT": str(attempt),
        }
        if self.prompt == "env":
            env["KJOB_PROMPT"] = prompt
        stdin = prompt.encode() if self.prompt == "stdin" else None
        return argv, stdin, env


def _check(agent: Agent) -> None:
    if not isinstance(agent.name, str) or not re.match(AGENT_NAME_PATTERN, agent.name):
        raise InvalidInput(
            f"{agent.name!r} is not an agent name: use up to 63 letters, digits, '_', '.', '-'", "name"
        )
    if agent.prompt not in PROMPT_MODES:
        modes = ", ".join(map(repr, PROMPT_MODES))
        raise InvalidInput(f"prompt must be one of {modes}, not {agent.prompt!r}", "prompt")
    if not agent.command or not all(isinstance(p, str) for p in agent.command) or not agent.command[0]:
        raise InvalidInput('command must be a non-empty list of strings, e.g. ["kode", "--print"]', "command")
    used = {name for part in agent.command for name in _placeholders(part)}
    if agent.prompt == "arg" and "prompt" not in used:
        raise InvalidInput('prompt = "arg" needs "{prompt}" in command, e.g. ["my-agent", "{prompt}"]', "command")
    if agent.prompt != "arg" and "prompt" in used:
        raise InvalidInput(
            f'"{{prompt}}" in command needs prompt = "arg" (this agent has prompt = "{agent.prompt}")', "command"
        )
    if agent.adapter not in ADAPTERS:
        raise InvalidInput(f"adapter must be one of {', '.join(sorted(ADAPTERS))}, not {agent.adapter!r}", "adapter")
    if agent.base_url is not None and not re.match(r"^https?://[^\s/]+", str(agent.base_url)):
        raise InvalidInput(f"base_url must be an http(s) URL, not {agent.base_url!r}", "base_url")
    if agent.model is not None and (not isinstance(agent.model, str) or not agent.model.strip()):
        raise InvalidInput("model must be a non-empty string", "model")
    if not isinstance(agent.description, str):
        raise InvalidInput("description must be a string", "description")
    for key, value in agent.env.items():
        if not isinstance(key, str) or not ENV_NAME_PATTERN.match(key):
            raise InvalidInput(f"env: {key!r} is not an environment variable name", "env")
        if key in RESERVED_ENV:
            raise InvalidInput(f"{key} is set by kjob for every run; choose another name", "env")
        if not isinstance(value, str) or "\x00" in value:
            raise InvalidInput(f"env {key} must be a string (quote numbers and booleans)", "env")


def _placeholders(part: str) -> list[str]:
    """The placeholder names in one argv template element; InvalidInput on anything else."""
    try:
        parsed = list(string.Formatter().parse(part))
    except ValueError:
        raise InvalidInput(
            f"{part!r} has an unmatched brace; write '{{{{' or '}}}}' for a literal one", "command"
        ) from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in PLACEHOLDERS or spec or conversion:
            raise InvalidInput(
                f"{part!r} uses {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}; "
                f"the placeholders are {', '.join('{' + p + '}' for p in PLACEHOLDERS)}",
                "command",
            )
        names.append(name)
    return names


# Cron's own choice: the prompt is the script of `sh -c`. Feeding the script on stdin instead
# (`sh -s`) would let any command in it that reads stdin (`cat`, `read`, an agent CLI) swallow
# the rest of the script. A prompt is at most 64 KiB, under Linux's 128 KiB per-argument limit.
# /bin/sh by absolute path: the sandbox gives the agent no host PATH to search.
SHELL = Agent(
    name="shell",
    command=("/bin/sh", "-c", "{prompt}"),
    prompt="arg",
    description="runs the prompt as a POSIX sh script (/bin/sh -c)",
)

BUILTIN_AGENTS = (SHELL,)


def parse_agents(text: str, source: str) -> list[Agent]:
    """The agents defined by one registry file's text. `source` names the file in errors.

    :raises InvalidInput: (field `executor.agents_file`) the text is not TOML, or an
        `[agents.<name>]` table is not a valid agent; the message names the file and agent.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InvalidInput(f"{source} is not valid TOML: {e}", _SETTING) from None
    extra = sorted(set(data) - {"agents"})
    if extra:
        raise InvalidInput(
            f"{source}: unknown top-level key {extra[0]!r}; define agents as [agents.<name>] tables", _SETTING
        )
    tables = data.get("agents", {})
    if not isinstance(tables, dict):
        raise InvalidInput(f"{source}: 'agents' must be a table of [agents.<name>] tables", _SETTING)
    return [_agent_from_table(name, table, source) for name, table in tables.items()]


def _agent_from_table(name: str, table: Any, source: str) -> Agent:
    where = f"{source}: [agents.{name}]"
    if not isinstance(table, dict):
        raise InvalidInput(f"{where} must be a table with at least `command = [...]`", _SETTING)
    unknown = sorted(set(table) - set(_AGENT_KEYS))
    if unknown:
        raise InvalidInput(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(_AGENT_KEYS)}", _SETTING)
    if "command" not in table:
        raise InvalidInput(f'{where}: command is required, e.g. command = ["kode", "--print"]', _SETTING)
    command, env, price = table["command"], table.get("env", {}), table.get("price")
    if price is not None and not (
        isinstance(price, dict) and set(price) == {"input", "output"}
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in price.values())
    ):
        raise InvalidInput(f"{where}: price must be {{ input = <USD per Mtok>, output = <USD per Mtok> }}", _SETTING)
    if not isinstance(command, list):
        raise InvalidInput(f'{where}: command must be a list of strings, e.g. ["kode", "--print"]', _SETTING)
    if not isinstance(env, dict):
        raise InvalidInput(f"{where}: env must be a table of strings", _SETTING)
    try:
        return Agent(
            name=name,
            command=tuple(command),
            prompt=table.get("prompt", "stdin"),
            env=env,
            description=table.get("description", ""),
            adapter=table.get("adapter", "plain"),
            base_url=table.get("base_url"),
            model=table.get("model"),
            price=Price(float(price["input"]), float(price["output"])) if price else None,
        )
    except InvalidInput as e:
        raise InvalidInput(f"{where}: {e.message}", _SETTING) from None


class AgentRegistry:
    """The agents one node can run, by name. Immutable once built."""

    def __init__(self, agents: Iterable[Agent]) -> None:
        self._agents: dict[str, Agent] = {}
        for agent in agents:
            self._agents[agent.name] = agent  # later definitions replace earlier ones

    @classmethod
    def load(cls, path: Path | None = None) -> "AgentRegistry":
        """Built-ins, then the packaged agents.toml, then the file at `path` (if any).

        :raises InvalidInput: (field `executor.agents_file`) `path` cannot be read, or a file
            is malformed.
        """
        packaged = resources.files("kjob").joinpath("agents.toml").read_text(encoding="utf-8")
        agents = [*BUILTIN_AGENTS, *parse_agents(packaged, "kjob/agents.toml (packaged)")]
        if path is not None:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise InvalidInput(
                    f"cannot read agents file {path}: {getattr(e, 'strerror', None) or e}; "
                    "fix the path or unset KJOB_EXECUTOR__AGENTS_FILE",
                    _SETTING,
                ) from None
            agents += parse_agents(text, str(path))
        return cls(agents)

    def get(self, name: str) -> Agent:
        """The agent called `name`.

        :raises InvalidInput: (field `agent`) no such agent; the message lists the known ones.
        """
        try:
            return self._agents[name]
        except KeyError:
            raise InvalidInput(
                f"unknown agent {name!r}; known agents: {', '.join(self.names())} "
                "(define more in the file named by KJOB_EXECUTOR__AGENTS_FILE)",
                "agent",
            ) from None

    def names(self) -> list[str]:
        return sorted(self._agents)

    def __contains__(self, name: object) -> bool:
        return name in self._agents

    def render(
        self, agent: Agent | str, *, prompt: str, run_id: str, slug: str, tenant: str, attempt: int,
        limits: dict[str, Any] | None = None,
    ) -> tuple[list[str], bytes | None, dict[str, str]]:
        """(argv, stdin, env) for one attempt of `agent` (an Agent or a name); see Agent.render."""
        if isinstance(agent, str):
            agent = self.get(agent)
        return agent.render(prompt=prompt, run_id=run_id, slug=slug, tenant=tenant, attempt=attempt, limits=limits)
