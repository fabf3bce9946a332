"""The CLI against a real gateway (uvicorn on a free port, real PostgreSQL), through typer's
test runner with the environment a user would set: KJOB_API_URL and KJOB_TOKEN."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner, Result

from kjob.cli.main import app
from kjob.store.tokens import TokenStore
from tests.support.gateway import GatewayServer

Run = Callable[..., Result]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty KJOB_HOME: no token file, no api.url, no config.toml."""
    path = tmp_path / "kjob-home"
    path.mkdir()
    return path


@pytest.fixture
def base_env(home: Path) -> dict[str, str | None]:
    """The environment of every CLI run: nothing from the developer's own kjob leaks in."""
    return {
        "KJOB_HOME": str(home),
        "KJOB_CONFIG": str(home / "config.toml"),
        "KJOB_API_URL": None,
        "KJOB_TOKEN": None,
        "COLUMNS": "200",
    }


@pytest.fixture
def server(database_url: str, home: Path) -> Iterator[GatewayServer]:
    with GatewayServer(database_url, home) as running:
        yield running


@pytest.fixture
async def token(engine: AsyncEngine) -> str:
    """An admin token of tenant `acme`."""
    _, secret = await TokenStore(engine).create("acme", "admin", "cli test")
    return secret


def runner_for(env: dict[str, str | None]) -> Run:
    def run(*args: str, input: str | None = None, **more_env: str | None) -> Result:
        return CliRunner().invoke(app, list(args), input=input, env={**env, **more_env})

    return run


@pytest.fixture
def kjob(base_env: dict[str, str | None], server: GatewayServer, token: str) -> Run:
    """`kjob(*args, input=None, **env)`: run the CLI as tenant acme's admin."""
    return runner_for({**base_env, "KJOB_API_URL": server.url, "KJOB_TOKEN": token})


@pytest.fixture
def offline(base_env: dict[str, str | None]) -> Run:
    """The CLI with no server anywhere (port 9 answers nothing)."""
    return runner_for({**base_env, "KJOB_API_URL": "http://127.0.0.1:9"})


def one_line_error(result: Result, field: str | None = None, code: int = 1) -> str:
    """Assert a one-line `error: ...` on stderr, nothing on stdout, and the exit code."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    prefix = f"error: {field}: " if field else "error: "
    assert lines[0].startswith(prefix), lines[0]
    assert result.stdout == ""
    return lines[0]
