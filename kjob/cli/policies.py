"""The scheduling policies on the command line: the `kjob create` flags that set them
(`policy_fields`) and `kjob backfill`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kjob.cli.output import Format, api, dump, print_json, say
from kjob.model.policies import OVERLAP_POLICIES

OverlapOpt = Annotated[
    str | None, typer.Option(help=f"while the previous run still runs: {' | '.join(OVERLAP_POLICIES)} [default: skip]")
]


def policy_fields(
    *,
    overlap: str | None,
    jitter: str | None,
    catchup_window: str | None,
    catchup_policy: str | None,
    pause_after_failures: int | None,
    keep_runs: int | None,
    keep_days: int | None,
) -> dict[str, Any]:
    """The JobSpec fields the `kjob create` policy flags set; flags not given are left out, so
    the job takes the defaults."""
    data: dict[str, Any] = {}
    for name, value in (("overlap", overlap), ("jitter", jitter), ("pause_after_failures", pause_after_failures)):
        if value is not None:
            data[name] = value
    for table, parts in (("catchup", (("window", catchup_window), ("policy", catchup_policy))),
                         ("history", (("keep_runs", keep_runs), ("keep_days", keep_days)))):
        given = {k: v for k, v in parts if v is not None}
        if given:
            data[table] = given
    return data


def backfill(
    slug: Annotated[str, typer.Argument(help="the job's slug")],
    start: Annotated[str, typer.Option("--from", help="first instant (included), ISO with Z or an offset")],
    end: Annotated[str, typer.Option("--to", help="last instant (included), in the past")],
    overlap: OverlapOpt = None,
    output: Annotated[Format, typer.Option("--output", "-o", help="table for people, json for programs")] = Format.table,
) -> None:
    """Run the job's slots of a past range (at most 1000).

    Slots that ran are not run again; slots recorded skipped or missed are. The runs follow
    the job's overlap policy unless --overlap names another; under skip they run one after
    another."""
    with api() as kjob:
        result = kjob.runs.backfill(slug, start, end, overlap=overlap)  # type: ignore[arg-type]
    if output is Format.json:
        print_json(dump(result))
        return
    if not result.slots:
        say(f"no slot of {slug} in that range: nothing to run")
        return
    say(f"backfill of {slug}: {result.queued} runs queued, {result.existing} slots already in the ledger "
        f"(not run again); overlap {result.overlap}")

def register(app: typer.Typer) -> None:
    app.command()(backfill)
