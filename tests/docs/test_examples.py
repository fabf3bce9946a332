"""The `console` examples of README.md and docs/cli.md, run as written against one real
`kjob up`, with what they print checked: so docs and program cannot drift apart again.

A block is ```console; `$ ` starts a command, `> ` continues it, the lines up to the next
command are its expected output. Matching (docs/cli.md says the same to its readers):

- text: each expected line matches an output line, in order (others may come between); `…`
  stands for any text and a run of spaces for any run of spaces, so tables are checked by
  their headers and the values that do not change;
- JSON (expected output starting with `[` or `{`): the answer parses; an expected object's
  keys are in the answer's, with equal values, `"…"` matching any; an expected array's items
  match the answer's first items;
- `# exit N` on the command line: its exit code (else 0); `RUN_ID`: the last run id printed.

`kjob` commands run in this process (tests/docs/conftest.Cli); anything else (a heredoc that
writes a job file) in bash, in the same scratch directory."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.docs.conftest import Cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "docs/cli.md"]
ANY = "…"
#: A run id as the CLI prints one: whole, or short (`run d05cc3de ...`, a table's first column).
RUN_ID = re.compile(r"(?m)(?:\brun |^|\")([0-9a-f]{8}(?:-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})?)\b")


@dataclass
class Example:
    doc: str
    line: int
    command: str
    expected: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        m = re.search(r"#\s*exit (\d+)\s*$", self.command.splitlines()[0])
        return int(m[1]) if m else 0


def examples(doc: str) -> list[list[Example]]:
    """The console blocks of `doc`, each a list of its examples."""
    blocks: list[list[Example]] = []
    current: list[Example] | None = None
    for number, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
        if current is None:
            if line.strip() == "```console":
                current = []
            continue
        if line.strip() == "```":
            blocks.append(current)
            current = None
        elif line.startswith("$ "):
            current.append(Example(doc, number, line[2:]))
        elif line.startswith("> ") or line == ">":
            current[-1].command += "\n" + line[2:]
        else:
            assert current, f"{doc}:{number}: output before any command"
            current[-1].expected.append(line)
    return blocks


def line_pattern(expected: str) -> re.Pattern[str]:
    parts = re.split(rf"({ANY}|\s+)", expected.strip())
    return re.compile("".join(".*" if p == ANY else r"\s+" if p.isspace() else re.escape(p) for p in parts if p))


def check_text(expected: list[str], output: str) -> None:
    lines = [line.strip() for line in output.splitlines()]
    at = 0
    for want in (w for w in expected if w.strip()):
        pattern = line_pattern(want)
        while at < len(lines) and not pattern.fullmatch(lines[at]):
            at += 1
        assert at < len(lines), f"no line like {want!r} (in order) in:\n{output}"
        at += 1


def check_json(expected: Any, actual: Any, where: str = "") -> None:
    if expected == ANY:
        return
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where or 'the answer'} is {actual!r}, not an object"
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} is missing: {sorted(actual)}"
            check_json(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) >= len(expected), f"{where}: {actual!r}"
        if not expected:
            assert actual == [], f"{where}: {actual!r} is not empty"
        for i, item in enumerate(expected):
            check_json(item, actual[i], f"{where}[{i}]")
    elif isinstance(expected, str) and ANY in expected:
        assert isinstance(actual, str) and line_pattern(expected).fullmatch(actual), f"{where}: {actual!r}"
    else:
        assert actual == expected, f"{where}: {actual!r}, the docs say {expected!r}"


class Shell:
    """Runs a block's commands in order, in one scratch directory, remembering the last run id."""

    def __init__(self, cli: Cli, scratch: Path) -> None:
        self.cli, self.scratch, self.run_id = cli, scratch, ""

    def run(self, example: Example) -> tuple[int, str, str]:
        command = example.command.replace("RUN_ID", self.run_id)
        args = shlex.split(command.splitlines()[0], comments=True) if "\n" not in command else []
        if args and args[0] == "kjob":
            cwd = os.getcwd()
            os.chdir(self.scratch)  # relative paths (kjob apply -f jobs.toml) as in a shell
            try:
                result = self.cli(*args[1:])
            finally:
                os.chdir(cwd)
            code, out, err = result.exit_code, result.stdout, result.stderr
        else:
            done = subprocess.run(["bash", "-c", command], cwd=self.scratch, capture_output=True, text=True, timeout=30)
            code, out, err = done.returncode, done.stdout, done.stderr
        ids = RUN_ID.findall(out + err)
        if ids:
            self.run_id = ids[-1]
        return code, out, err


BLOCKS = [(doc, i, block) for doc in DOCS for i, block in enumerate(examples(doc))]


def test_the_docs_hold_examples() -> None:
    # a doc that lost its console blocks would pass the test below by having none
    assert {doc for doc, _, _ in BLOCKS} == set(DOCS)
    assert sum(len(b) for _, _, b in BLOCKS) >= 25


@pytest.mark.parametrize(("doc", "index", "block"), BLOCKS, ids=[f"{d}#{i + 1}" for d, i, _ in BLOCKS])
def test_a_console_block_runs_as_written(cli: Cli, tmp_path: Path, doc: str, index: int,
                                         block: list[Example]) -> None:
    shell = Shell(cli, tmp_path)
    for example in block:
        code, out, err = shell.run(example)
        where = f"{example.doc}:{example.line}: $ {example.command}"
        assert code == example.exit_code, f"{where}\nexit {code}\n{out}{err}"
        text = "\n".join(example.expected).strip()
        if text.startswith(("[", "{")):
            try:
                answer = json.loads(out)
            except ValueError:
                raise AssertionError(f"{where}\nnot JSON:\n{out}{err}") from None
            try:
                check_json(json.loads(text), answer)
            except AssertionError as e:
                raise AssertionError(f"{where}\n{e}") from None
        else:
            try:
                check_text(example.expected, out + err)
            except AssertionError as e:
                raise AssertionError(f"{where}\n{e}") from None
