"""The job commands: create, apply, list, inspect, enable, disable, delete, and `next`
(which needs no server). Each prints one line or one table, or JSON with `-o json`."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from kjob._time import utcnow
from kjob.cli.output import Format, WideOpt, api, console, dump, job_table, jobs_table, print_json, say, slots_table
from kjob.cli.policies import OverlapOpt, policy_fields
from kjob.client import InvalidInput as ApiInvalidInput
from kjob.client import JobView
from kjob.errors import InvalidInput
from kjob.model.job import parse_job
from kjob.model.jobfile import load_job_tables, load_job_tables_file
from kjob.model.preview import MAX_PREVIEW, preview
from kjob.model.run import utc_text

INSPECT_SLOTS = 5

OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="table for people, json for programs")]
SlugArg = Annotated[str, typer.Argument(help="the job's slug")]


def _fire_text(job: JobView) -> str:
    if not job.enabled:
        return "disabled: no fire times until enabled"
    return f"next fire {job.next_fire}" if job.next_fire else "no fire time left"


def sandbox_spec(text: str) -> dict[str, str]:
    """`process`, `docker` or `docker:IMAGE` (the image may hold its own `:tag`)."""
    backend, _, image = text.partition(":")
    if backend not in ("process", "docker") or (backend == "process" and image):
        raise InvalidInput(
            f"{text!r} is not a sandbox; write 'process' or 'docker:IMAGE', e.g. 'docker:koder-cli:latest'", "sandbox"
        )
    return {"backend": backend, **({"image": image} if image else {})}


def create(
    slug: Annotated[str, typer.Option(help="the job's name: lowercase letters, digits, '-'")],
    prompt: Annotated[str, typer.Option(help="what the agent is asked to do")],
    schedule: Annotated[
        str, typer.Option(help="cron ('0 9 * * MON'), @daily, '@every 90s' or '@once 2026-05-15T10:00Z'")
    ],
    agent: Annotated[str, typer.Option(help="the agent that runs the prompt, e.g. kode")],
    tz: Annotated[
        str | None, typer.Option("--tz", help="IANA time zone the schedule is read in [default: UTC]")
    ] = None,
    sandbox: Annotated[str | None, typer.Option(help="'process' or 'docker:IMAGE' [default: process]")] = None,
    network: Annotated[str | None, typer.Option(
        help="the sandbox's network: none (no network at all), egress (the internet, not the host's own or "
             "private networks) or host [default: none]")] = None,
    output: Annotated[
        str | None, typer.Option("--output", help="result channel: a Relay channel, 'webhook:https://...' or 'none'")
    ] = None,
    retries: Annotated[int | None, typer.Option(help="extra attempts after a failure [default: 0]")] = None,
    backoff: Annotated[str | None, typer.Option(help="exponential or fixed [default: exponential]")] = None,
    timeout: Annotated[str | None, typer.Option(help="kill the run after this long, e.g. 30m, 1h30m (max 24h)")] = None,
    disabled: Annotated[bool, typer.Option("--disabled", help="create the job paused")] = False,
    description: Annotated[str | None, typer.Option(help="a note for people")] = None,
    overlap: OverlapOpt = None,
    jitter: Annotated[
        str | None, typer.Option(help="delay each slot by up to this much, the same for each slot, e.g. 30s")
    ] = None,
    catchup_window: Annotated[
        str | None, typer.Option(help="after downtime, missed slots this recent may run, e.g. 1h [default: 1h]")
    ] = None,
    catchup_policy: Annotated[
        str | None, typer.Option(help="after downtime, run the latest | all | none of them [default: latest]")
    ] = None,
    pause_after_failures: Annotated[
        int | None, typer.Option(help="pause the job after this many failed runs in a row, alerting its channel")
    ] = None,
    keep_runs: Annotated[int | None, typer.Option(help="keep only the newest N runs of history")] = None,
    keep_days: Annotated[int | None, typer.Option(help="keep run history for D days")] = None,
) -> None:
    """Create a job."""
    data: dict[str, Any] = {"slug": slug, "prompt": prompt, "schedule": schedule, "agent": agent}
    if tz is not None:
        data["timezone"] = tz
    if sandbox is not None or network is not None:
        data["sandbox"] = {**(sandbox_spec(sandbox) if sandbox is not None else {}),
                           **({"network": network} if network is not None else {})}
    if output is not None:
        data["output"] = {"channel": output}
    policy = {k: v for k, v in (("max", retries), ("backoff", backoff)) if v is not None}
    if policy:
        data["retries"] = policy
    if timeout is not None:
        data["timeout"] = timeout
    if disabled:
        data["enabled"] = False
    if description is not None:
        data["description"] = description
    data.update(policy_fields(
        overlap=overlap, jitter=jitter, catchup_window=catchup_window, catchup_policy=catchup_policy,
        pause_after_failures=pause_after_failures, keep_runs=keep_runs, keep_days=keep_days,
    ))
    spec = parse_job(data)  # refuse bad input before touching the network, with the API's words
    with api() as kjob:
        job = kjob.jobs.create(spec)
    say(f"created {job.slug}; {_fire_text(job)}")


def _read_jobs(file: str) -> list[tuple[str, dict[str, Any]]]:
    if file == "-":
        return load_job_tables(sys.stdin.read())
    return load_job_tables_file(Path(file))


def file_field(field: str | None, paths: list[str]) -> str | None:
    """The API names the i-th job of a batch `jobs.<i>.<field>` (from 0); say it as job file
    errors do, by the job's path in the file: `job.<field>` for a `[job]` file, `job[<i+1>].<field>`
    for `[[job]]` tables (`paths`: each job's, in order)."""
    m = re.match(r"^jobs\.(\d+)(.*)$", field or "")
    if not m or int(m[1]) >= len(paths):
        return field
    return paths[int(m[1])] + m[2]


def apply(
    file: Annotated[str, typer.Option("--file", "-f", help="a TOML job file ([job] or [[job]] tables); '-' for stdin")],
    output: OutputOpt = Format.table,
) -> None:
    """Create or update the jobs of a file. Idempotent; a bad file changes nothing."""
    # The file's own checks here; each job's, once, by the API before any is written (checking
    # them here too doubled the CPU of a file of 10,000 jobs, and the API's check is the one
    # that counts: only it knows the agents, channels and quotas).
    entries = _read_jobs(file)
    with api() as kjob:
        try:
            results = kjob.jobs.apply_actions([table for _, table in entries])
        except ApiInvalidInput as e:  # said as the file's own errors are: by file, job[<n>] and field
            e.field = file_field(e.field, [path for path, _ in entries])
            if file != "-":
                e.message = f"{Path(file)}: {e.message}"
            raise
    if output is Format.json:
        print_json([{"slug": r.slug, "action": r.action} for r in results])
        return
    say("\n".join(f"{r.action:<9} {r.slug}" for r in results))


def list_jobs(output: OutputOpt = Format.table, wide: WideOpt = False) -> None:
    """List the jobs of your tenant."""
    with api() as kjob:
        jobs = list(kjob.jobs.list())
    if output is Format.json:
        print_json(dump(jobs))
    elif not jobs:
        say("no jobs yet: create one with `kjob create` or `kjob apply -f FILE`")
    else:
        jobs_table(jobs, wide)


def inspect(slug: SlugArg, output: OutputOpt = Format.table, wide: WideOpt = False) -> None:
    """Show a job and its next fire times, in its zone and in UTC."""
    with api() as kjob:
        job = kjob.jobs.get(slug)
        fires = kjob.jobs.preview(job.schedule, tz=job.timezone, n=INSPECT_SLOTS) if job.enabled else []
    if output is Format.json:
        print_json({**dump(job), "next_fires": [utc_text(f) for f in fires]})
        return
    console(wide).print(job_table(dump(job)))  # long values (prompt, output) fold at the edge unless wide
    if job.usage_7d:  # the agents' spend, when the server records it (docs/agents.md)
        u = job.usage_7d
        say(f"last 7 days: {u['attempts']} attempts, {u.get('tokens_in') or 0} tokens in, "
            f"{u.get('tokens_out') or 0} out, {u.get('turns') or 0} turns, ${u.get('cost_usd') or 0:.4f}")
    say("")
    if not job.enabled:
        say("next fire times: none while the job is disabled (`kjob enable` resumes it from now)")
    elif not fires:
        say("next fire times: none: the schedule has no slot left")
    else:
        slots_table(fires, job.timezone, title=f"next {len(fires)} fire times")


def update(
    slug: SlugArg,
    set_: Annotated[list[str], typer.Option(
        "--set", metavar="FIELD=VALUE",
        help="a field to change, as in a job file: schedule='0 8 * * *', timeout=1h, retries.max=3, "
             "labels.team=ops (TOML values; a bare word is text); repeat for more")],
) -> None:
    """Change some fields of a job, keeping the others."""
    changes: dict[str, Any] = {}
    for item in set_:
        key, value = _assignment(item)
        parts = key.split(".")
        target = changes
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    with api() as kjob:
        job = kjob.jobs.update(slug, changes)
    say(f"updated {job.slug}; {_fire_text(job)}")


def _assignment(item: str) -> tuple[str, Any]:
    """`FIELD=VALUE` with VALUE read as a TOML value, or as text when it is not one."""
    key, sep, text = item.partition("=")
    if not sep or not re.fullmatch(r"[a-z_]+(\.[A-Za-z0-9_-]+)*", key):
        raise InvalidInput(f"{item!r} is not FIELD=VALUE, e.g. timeout=1h or retries.max=3", "set")
    try:
        return key, tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return key, text


def enable(slug: SlugArg) -> None:
    """Enable a job. Only slots after now run: no burst of missed ones."""
    with api() as kjob:
        job = kjob.jobs.enable(slug)
    say(f"enabled {job.slug}; {_fire_text(job)}")


def disable(
    slug: SlugArg,
    note: Annotated[str | None, typer.Option(help="why it is paused; shown by inspect")] = None,
) -> None:
    """Pause a job."""
    with api() as kjob:
        job = kjob.jobs.disable(slug, note=note)
    say(f"disabled {job.slug}")


def delete(
    slug: SlugArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
) -> None:
    """Delete a job and its run history. Asks first unless --yes."""
    with api() as kjob:
        job = kjob.jobs.get(slug)  # a missing job fails before the question, not after
        if not yes and not typer.confirm(f"Delete job {job.slug!r} and its run history?", default=False):
            say(f"not deleted: {job.slug}")
            raise typer.Exit(1)
        kjob.jobs.delete(slug)
    say(f"deleted {job.slug}")


def next_fires(
    expr: Annotated[str, typer.Argument(metavar="EXPR", help="a schedule: cron, @daily, '@every 90s', '@once ...'")],
    tz: Annotated[str, typer.Option("--tz", help="IANA time zone the schedule is read in")] = "UTC",
    after: Annotated[
        str | None, typer.Option(help="start after this ISO instant (local to --tz without an offset) [default: now]")
    ] = None,
    count: Annotated[int, typer.Option("-n", help=f"how many fire times (1..{MAX_PREVIEW})")] = 5,
    output: OutputOpt = Format.table,
) -> None:
    """Show when a schedule fires. Needs no server."""
    slots = preview(expr, tz, after, count, now=utcnow())
    if output is Format.json:
        print_json([utc_text(s) for s in slots])
    elif not slots:
        say("no fire time after that instant")
    else:
        slots_table(slots, tz)


def register(app: typer.Typer) -> None:
    app.command()(create)
    app.command()(apply)
    app.command("list")(list_jobs)
    app.command()(inspect)
    app.command()(update)
    app.command()(enable)
    app.command()(disable)
    app.command()(delete)
    app.command("next")(next_fires)
