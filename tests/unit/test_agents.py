"""The agent registry: what runs a job's prompt, and how the prompt gets there untouched."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kjob.errors import InvalidInput
from kjob.executor.agents import Agent, AgentRegistry

IDS = dict(run_id="run-7f3a", slug="nightly-audit", tenant="acme", attempt=2)

#: Everything a shell would expand, split or choke on, plus text that looks like a placeholder.
NASTY_PROMPTS = [
    "it's \"quoted\" and 'single'",
    "$(touch {marker}) `touch {marker}` ; touch {marker} && touch {marker} | touch {marker}",
    "${HOME} $KJOB_RUN_ID * ? [a-z] ~ \\ \\n",
    "{run_id} {prompt} {{ }} {0} {",
    "line one\nline two\n\ttabbed  double  spaces ",
    "-n --help",
    "ünïcödé ✓ 日本語",
]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agents.toml"
    path.write_text(text)
    return path


def test_builtin_and_packaged_agents_are_there_without_a_user_file() -> None:
    registry = AgentRegistry.load(None)

    assert registry.names() == ["claude", "codex", "kode", "kortex", "llm", "shell"]
    assert registry.get("claude").adapter == "claude" and registry.get("codex").adapter == "codex"
    assert registry.get("kode").command == ("kode", "--print")
    assert registry.get("kode").prompt == "stdin"


def test_shell_agent_runs_the_prompt_as_a_sh_script_with_the_run_facts_in_env() -> None:
    script = 'printf "%s|%s|%s|%s\\n" "$KJOB_RUN_ID" "$KJOB_JOB" "$KJOB_TENANT" "$KJOB_ATTEMPT"; exit 3'
    argv, stdin, env = AgentRegistry.load(None).render("shell", prompt=script, **IDS)

    assert argv == ["/bin/sh", "-c", script]
    assert stdin is None
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10)
    assert done.stdout == "run-7f3a|nightly-audit|acme|2\n"
    assert done.returncode == 3


@pytest.mark.parametrize("template", NASTY_PROMPTS)
def test_an_arg_prompt_reaches_the_agent_verbatim(template: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    prompt = template.replace("{marker}", str(marker))
    echo = Agent(name="echo", command=["printf", "%s", "{prompt}"], prompt="arg")

    argv, stdin, env = echo.render(prompt=prompt, **IDS)
    done = subprocess.run(argv, env=env, capture_output=True, timeout=10)

    assert done.stdout == prompt.encode()
    assert not marker.exists()


@pytest.mark.parametrize("prompt", NASTY_PROMPTS)
def test_a_stdin_prompt_is_the_exact_bytes_of_stdin(prompt: str) -> None:
    argv, stdin, env = AgentRegistry.load(None).render("kode", prompt=prompt, **IDS)

    assert argv == ["kode", "--print"]
    assert stdin == prompt.encode()
    assert "KJOB_PROMPT" not in env


def test_an_env_prompt_is_in_kjob_prompt_next_to_the_agents_own_env() -> None:
    agent = Agent(name="envy", command=["envy"], prompt="env", env={"MODEL": "small"})
    prompt = NASTY_PROMPTS[1]

    argv, stdin, env = agent.render(prompt=prompt, **IDS)

    assert (argv, stdin) == (["envy"], None)
    assert env == {
        "MODEL": "small",
        "KJOB_PROMPT": prompt,
        "KJOB_RUN_ID": "run-7f3a",
        "KJOB_JOB": "nightly-audit",
        "KJOB_TENANT": "acme",
        "KJOB_ATTEMPT": "2",
    }


def test_placeholders_fill_in_anywhere_in_an_argument_and_double_braces_stay_literal() -> None:
    agent = Agent(name="t", command=["t", "--session=kjob-{tenant}-{slug}-{run_id}", "#{attempt}", "{{json}}"])

    argv, _, _ = agent.render(prompt="p", **IDS)

    assert argv == ["t", "--session=kjob-acme-nightly-audit-run-7f3a", "#2", "{json}"]


def test_a_nul_byte_cannot_go_in_argv_and_says_so() -> None:
    with pytest.raises(InvalidInput) as err:
        AgentRegistry.load(None).render("shell", prompt="echo a\x00b", **IDS)
    assert err.value.field == "prompt"
    assert "NUL" in err.value.message


def test_user_file_replaces_agents_by_name_whole_and_adds_new_ones(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [agents.kode]
        command = ["/opt/kode/bin/kode", "run", "--id", "{run_id}"]
        prompt = "stdin"

        [agents.summarise]
        command = ["summarise", "{prompt}"]
        prompt = "arg"
        env = { SUMMARY_LANG = "en" }
        description = "one-paragraph summaries"
        """,
    )

    registry = AgentRegistry.load(path)

    assert registry.names() == ["claude", "codex", "kode", "kortex", "llm", "shell", "summarise"]
    argv, stdin, _ = registry.render("kode", prompt="hi", **IDS)
    assert (argv, stdin) == (["/opt/kode/bin/kode", "run", "--id", "run-7f3a"], b"hi")
    argv, stdin, env = registry.render("summarise", prompt="hi", **IDS)
    assert (argv, stdin, env["SUMMARY_LANG"]) == (["summarise", "hi"], None, "en")


def test_user_file_may_replace_the_builtin_shell(tmp_path: Path) -> None:
    path = write(tmp_path, '[agents.shell]\ncommand = ["/bin/bash", "-c", "{prompt}"]\nprompt = "arg"\n')

    argv, _, _ = AgentRegistry.load(path).render("shell", prompt="echo hi", **IDS)

    assert argv == ["/bin/bash", "-c", "echo hi"]


def test_unknown_agent_names_the_field_and_lists_the_known_ones() -> None:
    with pytest.raises(InvalidInput) as err:
        AgentRegistry.load(None).get("kodee")

    assert err.value.field == "agent"
    assert err.value.message.startswith("unknown agent 'kodee'; known agents: claude, codex, kode, kortex, llm, shell")
    assert "KJOB_EXECUTOR__AGENTS_FILE" in err.value.message


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[agents.kode\ncommand = []", "is not valid TOML"),
        ('[agents.kode]\ncommand = "kode --print"', "[agents.kode]: command must be a list"),
        ("[agents.kode]\ncommand = []", "[agents.kode]: command must be a non-empty list"),
        ('[agents.kode]\ncommand = ["kode", 3]', "[agents.kode]: command must be a non-empty list"),
        ('[agents.kode]\nprompt = "stdin"', "[agents.kode]: command is required"),
        ('[agents.kode]\ncommand = ["kode"]\nprompts = "stdin"', "[agents.kode]: unknown key 'prompts'"),
        ('[agents.kode]\ncommand = ["kode"]\nprompt = "pipe"', "[agents.kode]: prompt must be one of"),
        ('[agents.kode]\ncommand = ["kode"]\nprompt = "arg"', 'needs "{prompt}" in command'),
        ('[agents.kode]\ncommand = ["kode", "{prompt}"]', 'needs prompt = "arg"'),
        ('[agents.kode]\ncommand = ["kode", "--home={home}"]', "uses {home}; the placeholders are"),
        ('[agents.kode]\ncommand = ["kode", "{attempt:03d}"]', "uses {attempt:03d}"),
        ('[agents.kode]\ncommand = ["kode", "{prompt.__class__}"]\nprompt = "arg"', "uses {prompt.__class__}"),
        ('[agents.kode]\ncommand = ["kode", "{run_id"]', "unmatched brace"),
        ('[agents.kode]\ncommand = ["kode"]\nenv = { KJOB_RUN_ID = "x" }', "KJOB_RUN_ID is set by kjob"),
        ('[agents.kode]\ncommand = ["kode"]\nenv = { DEBUG = 1 }', "env DEBUG must be a string"),
        ('[agents.kode]\ncommand = ["kode"]\nenv = ["A=1"]', "env must be a table"),
        ('[agents.kode]\ncommand = ["kode"]\nenv = { "A-B" = "1" }', "'A-B' is not an environment variable name"),
        ('[agents."bad name"]\ncommand = ["x"]', "is not an agent name"),
        ("[agents]\nkode = 5", "[agents.kode] must be a table"),
        ('[agent.kode]\ncommand = ["kode"]', "unknown top-level key 'agent'"),
        ('agents = ["kode"]', "'agents' must be a table"),
    ],
)
def test_a_malformed_file_is_refused_naming_file_agent_and_problem(tmp_path: Path, text: str, says: str) -> None:
    path = write(tmp_path, text)

    with pytest.raises(InvalidInput) as err:
        AgentRegistry.load(path)

    assert err.value.field == "executor.agents_file"
    assert err.value.message.startswith(f"{path}")
    assert says in err.value.message


def test_a_missing_user_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"

    with pytest.raises(InvalidInput) as err:
        AgentRegistry.load(missing)

    assert err.value.field == "executor.agents_file"
    assert str(missing) in err.value.message
    assert "unset KJOB_EXECUTOR__AGENTS_FILE" in err.value.message


def test_an_agent_built_in_code_is_checked_too() -> None:
    with pytest.raises(InvalidInput) as err:
        Agent(name="x", command=["x", "{prompt}"], prompt="stdin")
    assert err.value.field == "command"
