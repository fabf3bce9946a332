"""The run commands: run-now (optionally waiting for the outcome), runs (history), logs."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from kjob.cli.client import ApiClient, resolve
from kjob.cli.output import Format, console, print_json, say
from kjob.config import Settings
from kjob.model.run import FINAL_STATUSES, RunStatus

OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="table for people, json for programs")]
FINAL = {s.value for s in FINAL_STATUSES}


def _client() -> ApiClient:
    return ApiClient(resolve(Settings()))


def _duration(run: dict[str, Any]) -> str:
    d = run.get("duration_s")
    return "-" if d is None else f"{d:.1f}s"


def runs_table(runs: list[dict[str, Any]]) -> Table:
    table = Table()
    table.add_column("RUN ID", no_wrap=True)
    for name in ("SLOT (UTC)", "TRIGGER", "STATUS", "TRY", "STARTED", "TOOK", "DELIVERY"):
        table.add_column(name, overflow="fold")
    for r in runs:
        status = r["status"] + (f" ({r['reason']})" if r["status"] in ("missed", "skipped") and r.get("reason") else "")
        table.add_row(r["id"], _short(r["slot"]), r["trigger"], status, str(r["attempt"]), _short(r.get("started_at")),
                      _duration(r), r["delivery_status"])
    return table


def _short(instant: str | None) -> str:
    """`2026-11-26T07:33:22.014014Z` -> `11-26 07:33:22`: the table is read by people, -o json by programs."""
    return "-" if not instant else instant[5:19].replace("T", " ")


def run_now(
    slug: Annotated[str, typer.Argument(help="the job's slug")],
    wait: Annotated[bool, typer.Option("--wait", help="wait for the run to end and print its outcome")] = False,
    timeout: Annotated[float, typer.Option(help="with --wait: give up after this many seconds")] = 3600,
    output: OutputOpt = Format.table,
) -> None:
    """Run a job now, outside its schedule."""
    with _client() as api:
        run = api.run_now(slug)
        if not wait:
            print_json(run) if output is Format.json else say(f"started run {run['id']} of {slug}")
            return
        deadline = time.monotonic() + timeout
        with console().status(f"running {slug} (run {run['id']})…", spinner="dots"):
            while run["status"] not in FINAL:
                if time.monotonic() > deadline:
                    raise typer.Exit(_exit(f"error: run {run['id']} still {run['status']} after {timeout:.0f}s; "
                                           f"follow it with `kjob logs -f {run['id']}`"))
                time.sleep(0.25)
                run = api.get_run(run["id"])
        log = api.logs(run["id"])
    if output is Format.json:
        print_json({**run, "output": log})
    else:
        if log:
            sys.stdout.write(log if log.endswith("\n") else log + "\n")
        detail = f" (exit code {run['exit_code']})" if run.get("exit_code") not in (None, 0) else ""
        reason = f": {run['reason']}" if run.get("reason") and run["status"] != "succeeded" else ""
        say(f"run {run['id']} {run['status']}{detail}{reason} after {run['attempt']} attempt(s), {_duration(run)}")
    if run["status"] != RunStatus.succeeded.value:
        raise typer.Exit(1)


def _exit(message: str) -> int:
    typer.echo(message, err=True)
    return 1


def runs(
    slug: Annotated[str, typer.Argument(help="the job's slug")],
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="how many, newest first")] = 20,
    output: OutputOpt = Format.table,
) -> None:
    """A job's run history, newest first."""
    with _client() as api:
        history = api.list_runs(slug, limit)
        ranges = api.missed_ranges(slug) if output is Format.table else []
    if output is Format.json:
        print_json(history)
    elif not history and not ranges:
        say(f"no runs of {slug} yet; start one with `kjob run-now {slug}`")
    else:
        console().print(runs_table(history))
        for r in ranges:  # slots of a long downtime, older than those listed (GET /v1/jobs/{slug}/missed)
            count = f"{r['count']}" if r["count_exact"] else f"at least {r['count']}"
            say(f"missed: {count} slots from {_short(r['first_slot'])} to {_short(r['last_slot'])} ({r['reason']})")


def logs(
    run_id: Annotated[str, typer.Argument(help="the run id (see `kjob runs SLUG`)")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream live output until the run ends")] = False,
) -> None:
    """A run's output (stdout and stderr)."""
    with _client() as api:
        if follow:
            for chunk in api.follow_logs(run_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        else:
            sys.stdout.write(api.logs(run_id))


def register(app: typer.Typer) -> None:
    app.command("run-now")(run_now)
    app.command()(runs)
    app.command()(logs)
