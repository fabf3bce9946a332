"""How the CLI prints: tables for people, plain JSON for programs (`-o json`).

Tables fit the terminal (80 columns when piped): one line a row, narrow values, and long free
text cut short with "…"; `--wide` prints every value whole, with more columns. The JSON shapes
are a contract (docs/cli.md); tables are not and may change.
"""

from __future__ import annotations

import enum
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from kjob.client import Client
from kjob.model.run import utc_text
from kjob.model.schedule import zone
from kjob.model.views import JobView


class Format(str, enum.Enum):
    table = "table"
    json = "json"


WideOpt = Annotated[bool, typer.Option("--wide", "-w", help="every value whole, and more columns")]


def api() -> Client:
    """The client of the API for one command: URL and token as docs/cli.md says."""
    return Client()


def dump(data: BaseModel | Iterable[BaseModel]) -> Any:
    """A model (or several) as the API's JSON."""
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json")
    return [d.model_dump(mode="json") for d in data]


def console(wide: bool = False) -> Console:
    # Built per call: the CLI runner of the tests swaps sys.stdout between commands.
    return Console(highlight=False, soft_wrap=False, width=WIDE_WIDTH if wide else None)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def say(text: str) -> None:
    """One plain line for people (no markup, no wrapping)."""
    typer.echo(text)


def local_text(moment: datetime, tz: str) -> str:
    """`2026-03-08 03:00:00 EDT`: the wall clock in `tz` with its abbreviation."""
    return moment.astimezone(zone(tz)).strftime("%Y-%m-%d %H:%M:%S %Z")


@dataclass(frozen=True)
class Col:
    header: str
    #: 0: never cut. 1: cut short (ending in "…") so the table fits the terminal. 2: cut only
    #: when the columns of 1 are down to their minimum (a name, which should stay readable).
    flex: int = 0
    right: bool = False
    #: The fewest characters a cut leaves.
    min: int = 8


#: The width `--wide` lays rich output out in: wide enough that nothing folds.
WIDE_WIDTH = 100_000

#: Two spaces between columns.
GAP = "  "


def terminal_width() -> int:
    """COLUMNS, else the terminal's width, else 80 (piped output)."""
    return shutil.get_terminal_size((80, 24)).columns


def _fit(widths: list[int], columns: Sequence[Col], width: int) -> list[int]:
    """Narrow the flexible columns, the widest of the lowest level first, until the table fits."""
    widths = list(widths)
    excess = sum(widths) + len(GAP) * (len(widths) - 1) - width
    for level in (1, 2):
        while excess > 0:
            cuttable = [i for i, c in enumerate(columns) if c.flex == level and widths[i] > max(c.min, len(c.header))]
            if not cuttable:
                break
            widest = max(cuttable, key=lambda i: widths[i])
            widths[widest] -= 1
            excess -= 1
    return widths


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def table(columns: Sequence[Col], rows: Iterable[Sequence[object]], *, wide: bool = False) -> str:
    """Plain aligned columns, one line a row: every value on one line, the flexible columns
    cut short to fit the terminal unless `wide`. None prints as "-"."""
    cells = [["-" if v is None else str(v).replace("\n", " ") for v in row] for row in rows]
    widths = [max([len(c.header), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    if not wide:
        widths = _fit(widths, columns, terminal_width())

    def line(values: Sequence[str]) -> str:
        parts = [_cut(v, w).rjust(w) if c.right else _cut(v, w).ljust(w) for v, w, c in zip(values, widths, columns)]
        return GAP.join(parts).rstrip()

    return "\n".join([line([c.header for c in columns]), *(line(r) for r in cells)])


def print_table(columns: Sequence[Col], rows: Iterable[Sequence[object]], *, wide: bool = False,
                title: str | None = None) -> None:
    if title:
        say(title)
    say(table(columns, rows, wide=wide))


def when(instant: object, wide: bool) -> str | None:
    """An instant for a table: `11-26 07:33:22` (UTC) narrow, as the API wrote it when wide."""
    if instant is None:
        return None
    text = instant if isinstance(instant, str) else utc_text(instant)  # type: ignore[arg-type]
    return text if wide else text[5:19].replace("T", " ")


def slots_table(slots: Iterable[datetime], tz: str, title: str | None = None) -> None:
    """UTC instants shown in `tz` and in UTC, numbered."""
    rows = [[i, local_text(slot, tz), utc_text(slot)] for i, slot in enumerate(slots, 1)]
    print_table([Col("#", right=True), Col(f"LOCAL ({tz})"), Col("UTC")], rows, title=title)


def jobs_table(jobs: Iterable[JobView], wide: bool = False) -> None:
    columns = [Col("SLUG", flex=2, min=16), Col("SCHEDULE", flex=1), Col("TIMEZONE", flex=1), Col("AGENT"),
               Col("ENABLED"), Col("NEXT FIRE (UTC)")]
    extra = [Col("SANDBOX"), Col("OUTPUT"), Col("DESCRIPTION")] if wide else []
    rows = []
    for job in jobs:
        fire = job.next_fire if wide or not job.next_fire else job.next_fire[:19].replace("T", " ")
        row: list[object] = [job.slug, job.schedule, job.timezone, job.agent, "yes" if job.enabled else "no", fire]
        if wide:
            row += [_sandbox(job.sandbox.backend, job.sandbox.image), job.output.channel, job.description or None]
        rows.append(row)
    print_table(columns + extra, rows, wide=wide)


def _sandbox(backend: str, image: str | None) -> str:
    return backend + (f" ({image})" if image else "")


def job_table(job: dict[str, Any]) -> Table:
    """The job's fields, one per row."""
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    sandbox = job["sandbox"]
    retries = job["retries"]
    rows = [
        ("slug", job["slug"]),
        ("tenant", job["tenant"]),
        ("enabled", "yes" if job["enabled"] else "no"),
        *([] if job["enabled"] else [("paused", _paused(job))]),
        ("schedule", job["schedule"]),
        ("timezone", job["timezone"]),
        ("agent", job["agent"]),
        ("sandbox", _sandbox(sandbox["backend"], sandbox.get("image"))),
        ("network", NETWORK_WORDS.get(sandbox.get("network", "none"), sandbox.get("network"))),
        ("output", job["output"]["channel"]),
        ("retries", f"{retries['max']} ({retries['backoff']})"),
        ("timeout", job["timeout"]),
        *_policy_rows(job),
        ("description", job.get("description") or "-"),
        ("created", job["created_at"]),
        ("updated", job["updated_at"]),
        ("prompt", job["prompt"]),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    return table


#: `sandbox.network` in words (docs/sandboxes.md): `none` surprises a job that fetches a URL.
NETWORK_WORDS = {
    "none": "none (no network: set --network egress to reach the internet)",
    "egress": "egress (the internet; not the host's own or private networks)",
    "host": "host (the node's own network)",
}


def _paused(job: dict[str, Any]) -> str:
    """`since 2026-11-26T07:00:00Z: <note>`: when and why the job was paused."""
    since = f"since {job['paused_at']}" if job.get("paused_at") else "yes"
    return f"{since}: {job['paused_note']}" if job.get("paused_note") else since


_CATCHUP_WORDS = {
    "latest": "after downtime, run the latest missed slot of the last {}",
    "all": "after downtime, run every missed slot of the last {}",
    "none": "after downtime, run no missed slot",
}


def _policy_rows(job: dict[str, Any]) -> list[tuple[str, str]]:
    """The scheduling policies (kjob.model.policies), each in words."""
    catchup = job.get("catchup") or {}
    history = job.get("history") or {}
    keep = [f"newest {history['keep_runs']} runs"] if history.get("keep_runs") else []
    keep += [f"{history['keep_days']} days"] if history.get("keep_days") else []
    failures = job.get("pause_after_failures")
    return [
        ("overlap", job.get("overlap", "skip")),
        ("catch-up", _CATCHUP_WORDS.get(catchup.get("policy", "latest"), "?").format(catchup.get("window", "1h"))),
        ("jitter", "none" if job.get("jitter", "0s") == "0s" else f"up to {job['jitter']}"),
        ("pause after", f"{failures} failed runs in a row" if failures else "never"),
        ("history", "keep " + ", ".join(keep) if keep else "keep all"),
    ]
