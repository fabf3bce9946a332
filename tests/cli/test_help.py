"""The help of `kjob` and of every subcommand, rendered at 80 columns as a terminal shows it:
no line wider than 80, no word cut in two, and no sentence broken where its next word would
still have fitted (a docstring's own line breaks did that: "The runs follow" / "the job's
overlap policy ..." on two lines of 20 and 70 characters)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import typer
from typer.testing import CliRunner

from kjob.cli.main import app

WIDTH = 80
#: Words typer puts on a line of their own on purpose.
OWN_LINE = re.compile(r"^\[(required|default|env var)")


def commands(group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    # (typer may vendor its own click: groups are told by their commands, not by class)
    yield path
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name)


ROOT = typer.main.get_command(app)
ALL = list(commands(ROOT))


def source_words() -> set[str]:
    """Every word of every help text the CLI has: a rendered word outside it was cut."""
    words: set[str] = set()

    def add(text: str | None) -> None:
        words.update(re.findall(r"[\w'.:/@*-]+", text or ""))

    def walk(command) -> None:
        add(command.help)
        for param in command.params:
            add(getattr(param, "help", None))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(ROOT)
    return words


def rendered(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(WIDTH), "TERM": "xterm"})
    assert result.exit_code == 0, result.output
    return result.output


def cells(text: str) -> Iterator[list[tuple[str, int]]]:
    """The help's blocks of wrapped text, as (line, room) pairs: the room is how many columns
    the block's lines may fill. One block per paragraph outside the boxes, per cell inside."""
    block: list[tuple[str, int]] = []
    col = -1
    for line in text.splitlines():
        boxed = line.startswith("│") and line.endswith("│")
        if boxed:
            inner = line[1:-1]
            start = len(inner) - len(inner.lstrip())
            if block and col >= 0 and start == col and inner.strip():  # the cell above goes on
                block.append((inner[start:].rstrip(), len(inner) - col - 1))
                continue
            if block:
                yield block
            # a row's help starts after its last wide gap (option, metavar, then help)
            gaps = list(re.finditer(r"\s{2,}(?=\S)", inner))
            col = gaps[-1].end() if len(gaps) > 1 or (gaps and start < gaps[-1].start()) else start
            block = [(inner[col:].rstrip(), len(inner) - col - 1)]
            continue
        if line.strip() and not line.startswith(("╭", "╰", " Usage:")):
            if col != -1 and block:
                yield block
                block = []
            col = -1
            block.append((line.strip(), WIDTH - 2))
            continue
        if block:
            yield block
        block, col = [], -1
    if block:
        yield block


@pytest.mark.parametrize("path", ALL, ids=[" ".join(p) or "kjob" for p in ALL])
def test_help_fits_80_columns_and_breaks_only_where_it_must(path: tuple[str, ...]) -> None:
    text = rendered(path)
    for line in text.splitlines():
        assert len(line) <= WIDTH, f"{len(line)} columns: {line!r}"
    known = source_words()
    for block in cells(text):
        for (above, room), (below, _) in zip(block, block[1:]):
            if not above or not below or OWN_LINE.match(below):
                continue
            first = below.split()[0]
            assert len(above) + 1 + len(first) > room, (
                f"a line break with room for the next word {first!r} ({room} columns):\n{above}\n{below}")
            tail = re.findall(r"[\w'.:/@*-]+$", above)
            head = re.findall(r"^[\w'.:/@*-]+", below)
            if tail and head:
                assert not (tail[0] + head[0] in known and tail[0] not in known), \
                    f"a word cut in two: {above!r} / {below!r}"


def test_the_cli_starts_without_the_servers_libraries() -> None:
    # Every command pays for what `kjob` imports at start: the server's stack (FastAPI, the
    # store's SQLAlchemy and cryptography) was most of a second of each `kjob apply`.
    code = "import sys, kjob.cli.main; print(' '.join(sorted(m for m in sys.modules if '.' not in m)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "typer" in loaded and "httpx" in loaded  # what a client command needs
    assert not {"fastapi", "starlette", "sqlalchemy", "cryptography", "uvicorn", "asyncpg"} & set(loaded)
