"""The run commands: run-now (optionally waiting for the outcome), runs (history), logs.

Run ids may be given short, as tables show them (like git's hashes): the gateway resolves any
prefix of at least 4 characters that starts only one of the tenant's runs."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterable
from typing import Annotated

import typer

from kjob.cli.output import Col, Format, WideOpt, api, console, dump, print_json, print_table, say, when
from kjob.client import Client, RunStatus, RunView, WaitTimedOut
from kjob.errors import KjobError
from kjob.model.hints import network_hint
from kjob.model.run import SHORT_RUN_ID

OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="table for people, json for programs")]
RunIdArg = Annotated[str, typer.Argument(help="the run id, or its first 4 or more characters (see `kjob runs SLUG`)")]


def took(run: RunView) -> str | None:
    """`0.4s`, `12.3s`, `5m03s`, `2h01m`: how long the run ran."""
    d = run.duration_s
    if d is None:
        return None
    if d < 60:
        return f"{d:.1f}s"
    minutes, seconds = divmod(int(d), 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def outcome(run: RunView) -> str:
    """One line saying how a run ended and why: `run d05cc3de failed (exit code 2): ...`."""
    detail = f" (exit code {run.exit_code})" if run.exit_code not in (None, 0) else ""
    reason = f": {run.reason}" if run.reason and run.status is not RunStatus.succeeded else ""
    return f"run {run.id[:SHORT_RUN_ID]} {run.status.value}{detail}{reason}"


def runs_table(runs: list[RunView], wide: bool = False) -> None:
    columns = [Col("RUN"), Col("SLOT (UTC)"), Col("TRIGGER"), Col("STATUS"), Col("EXIT", right=True), Col("TOOK"),
               Col("DELIVERY"), Col("REASON", flex=1)]
    if wide:
        columns[6:6] = [Col("TRY", right=True), Col("STARTED (UTC)")]
    rows = []
    for r in runs:
        row: list[object] = [r.id if wide else r.id[:SHORT_RUN_ID], when(r.slot, wide), r.trigger.value,
                             r.status.value, r.exit_code, took(r), r.delivery_status.value, r.reason or r.error]
        if wide:
            row[6:6] = [r.attempt, when(r.started_at, wide)]
        rows.append(row)
    print_table(columns, rows, wide=wide)


def run_now(
    slug: Annotated[str, typer.Argument(help="the job's slug")],
    wait: Annotated[bool, typer.Option("--wait", help="wait for the run to end and print its outcome")] = False,
    timeout: Annotated[float, typer.Option(help="with --wait: give up after this many seconds")] = 3600,
    output: OutputOpt = Format.table,
) -> None:
    """Run a job now, outside its schedule."""
    with api() as kjob:
        run = kjob.runs.run_now(slug)
        if not wait:
            run = _started(kjob, run)
            if output is Format.json:
                print_json(dump(run))
            elif run.status is RunStatus.scheduled:
                say(f"queued run {run.id} of {slug}: no executor has started it yet "
                    f"(`kjob logs -f {run.id[:SHORT_RUN_ID]}` follows it)")
            elif run.status is RunStatus.skipped or (run.status.final and run.started_at is None):
                # skipped (overlap `skip`, the cost cap), or ended before it could start
                raise typer.Exit(_exit(f"{outcome(run)}; nothing was started"))
            else:
                say(f"started run {run.id} of {slug}")
            return
        try:
            with console().status(f"running {slug} (run {run.id[:SHORT_RUN_ID]})…", spinner="dots"):
                run = kjob.runs.wait(run.id, timeout_s=timeout)
        except WaitTimedOut as e:
            raise typer.Exit(_exit(f"error: {e}; follow it with `kjob logs -f {run.id[:SHORT_RUN_ID]}`")) from None
        log = list(kjob.runs.logs(run.id))
        hint = failure_hint(kjob, run, log)
    if output is Format.json:
        print_json({**dump(run), "output": "".join(f"{line}\n" for line in log)})
    else:
        _write(log)
        say(f"{outcome(run)} after {run.attempt} attempt(s), {took(run) or '-'}")
        if hint:
            say(hint)
    if run.status is not RunStatus.succeeded:
        raise typer.Exit(1)


def failure_hint(kjob: Client, run: RunView, log: list[str]) -> str | None:
    """What to change, when a failed run's output says so (kjob.model.hints); None otherwise."""
    if not run.status.final or run.status is RunStatus.succeeded:
        return None
    try:
        network = kjob.jobs.get(run.slug).sandbox.network
    except KjobError:  # the job was deleted since: no hint rather than no outcome
        return None
    return network_hint(network, [run.reason, run.error, *log[-50:]])


#: How long `run-now` waits for an executor to take the run (or skip it) before saying it is queued.
START_WAIT_S = 10.0


def _started(kjob: Client, run: RunView) -> RunView:
    """The run once an executor took it, started or skipped it (overlap `skip`), or as it is
    after START_WAIT_S: so `run-now` never says "started" of a run that was not."""
    deadline = time.monotonic() + START_WAIT_S
    delay = 0.05
    while run.status is RunStatus.scheduled and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
        run = kjob.runs.get(run.id)
    return run


def _exit(message: str) -> int:
    typer.echo(message, err=True)
    return 1


def _write(lines: Iterable[str]) -> None:
    for line in lines:
        sys.stdout.write(f"{line}\n")
        sys.stdout.flush()


def runs(
    slug: Annotated[str, typer.Argument(help="the job's slug")],
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="how many, newest first")] = 20,
    output: OutputOpt = Format.table,
    wide: WideOpt = False,
) -> None:
    """A job's run history, newest first: how each run ended (exit code) and why."""
    with api() as kjob:
        history = list(itertools.islice(kjob.runs.list(slug, page_size=min(limit, 1000)), limit))
        ranges = kjob.runs.missed(slug) if output is Format.table else []
    if output is Format.json:
        print_json(dump(history))
    elif not history and not ranges:
        say(f"no runs of {slug} yet; start one with `kjob run-now {slug}`")
    else:
        runs_table(history, wide)
        for r in ranges:  # slots of a long downtime, older than the runs listed
            count = f"{r.count}" if r.count_exact else f"at least {r.count}"
            say(f"missed: {count} slots from {when(r.first_slot, wide)} to {when(r.last_slot, wide)} ({r.reason})")


def logs(
    run_id: RunIdArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream live output until the run ends")] = False,
) -> None:
    """A run's output (stdout and stderr); for a run that did not succeed, why, and exit 1."""
    with api() as kjob:
        lines: list[str] = []
        for line in kjob.runs.logs(run_id, follow=follow):
            _write([line])
            lines.append(line)
            del lines[:-50]  # the tail is what a hint reads; a long log is not kept whole
        run = kjob.runs.get(run_id)
        hint = failure_hint(kjob, run, lines)
    if run.status.final and run.status is not RunStatus.succeeded:
        _exit(outcome(run))
        raise typer.Exit(_exit(hint) if hint else 1)


def register(app: typer.Typer) -> None:
    app.command("run-now")(run_now)
    app.command()(runs)
    app.command()(logs)
