"""`kjob`: the command line. A client of the HTTP gateway, except `next` (pure) and the serving
commands `up`, `server` and `db` (kjob.cli.serve).

Errors are one line on stderr, `error: <field>: <message>`, never a traceback: exit code 1
for a refused or failed action, 2 for a command line that does not parse.
"""

from __future__ import annotations

import inspect
import tomllib
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from kjob.cli import admin, dashboard, jobs, policies, runs, serve, status
from kjob.config import config_file
from kjob.errors import KjobError
from kjob.model.job import validation_error

EXIT_FAILED = 1
EXIT_USAGE = 2

#: Click's UsageError as typer raises it: recent typer versions vendor their own copy of click,
#: so the class is found through typer rather than imported from `click`.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


class _OneLineErrors(TyperGroup):
    """Turns every expected error of a command into one line and an exit code. This sits on
    the group, so the test runner and the console script behave alike."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
            message = e.format_message().replace("Value error, ", "")
            raise fail(message + hint, EXIT_USAGE) from None
        except KjobError as e:
            raise fail(str(e)) from None
        except ValidationError as e:  # settings from KJOB_* or config.toml that do not parse
            raise fail(f"configuration: {validation_error(e)}") from None
        except tomllib.TOMLDecodeError as e:
            raise fail(f"configuration: {config_file()} is not valid TOML: {e}; fix it or set KJOB_CONFIG") from None


app = typer.Typer(
    cls=_OneLineErrors,
    name="kjob",
    help="Cluster-wide, multi-tenant cron for AI agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(show: bool) -> None:
    if show:
        typer.echo(f"kjob {kjob_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Cluster-wide, multi-tenant cron for AI agents."""


jobs.register(app)
runs.register(app)
status.register(app)
policies.register(app)
serve.register(app)
admin.register(app)
dashboard.register(app)


def reflow(text: str | None) -> str | None:
    """A docstring's paragraphs as one line each. Typer keeps a docstring's own line breaks,
    which cut sentences short in the middle of an 80-column terminal; one line a paragraph
    lets the help wrap each at the terminal's width instead."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _reflow_all(group: typer.Typer) -> None:
    for command in group.registered_commands:
        command.help = reflow(command.help or inspect.getdoc(command.callback))
    for sub in group.registered_groups:
        if sub.typer_instance is None:
            continue
        sub.help = reflow(sub.help or sub.typer_instance.info.help)
        sub.typer_instance.info.help = sub.help
        _reflow_all(sub.typer_instance)


_reflow_all(app)


def kjob_version() -> str:
    try:
        return version("koder-scheduler")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def main() -> None:
    """The `kjob` console script."""
    app()
