"""One real `kjob up` (embedded NATS and PostgreSQL, a home of its own) for the tests of this
directory, and a CLI that talks to it as a user's shell would: KJOB_HOME, 80 columns."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from kjob.cli.main import app
from tests.support.up import Up


class Cli:
    """`kjob ARGS` in this process (the CLI's import costs seconds on a loaded machine; a
    process per command would make the docs test slow), with the environment of a shell."""

    def __init__(self, home: Path) -> None:
        self.env: dict[str, str | None] = {"KJOB_HOME": str(home), "KJOB_CONFIG": str(home / "config.toml"),
                                           "KJOB_API_URL": None, "KJOB_TOKEN": None, "COLUMNS": "80"}

    def __call__(self, *args: str) -> Result:
        return CliRunner().invoke(app, list(args), env=self.env)


@pytest.fixture(scope="package")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    home = tmp_path_factory.mktemp("docs-up") / "home"
    home.mkdir()
    running = Up(home).start()
    try:
        yield running
    finally:
        assert running.stop() == 0, running.logs()


@pytest.fixture(scope="package")
def cli(up: Up) -> Cli:
    return Cli(up.home)
