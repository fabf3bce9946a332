"""How the CLI prints: rich tables for people, plain JSON for programs (`-o json`).

The JSON shapes are a contract (docs/cli.md); tables are not and may change.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from kjob.model.schedule import zone


class Format(str, enum.Enum):
    table = "table"
    json = "json"


def console() -> Console:
    # Built per call: the CLI runner of the tests swaps sys.stdout between commands.
    return Console(highlight=False, soft_wrap=False)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def say(text: str) -> None:
    """One plain line for people (no markup, no wrapping)."""
    typer.echo(text)


def local_text(moment: datetime, tz: str) -> str:
    """`2026-03-08 03:00:00 EDT`: the wall clock in `tz` with its abbreviation."""
    return moment.astimezone(zone(tz)).strftime("%Y-%m-%d %H:%M:%S %Z")


def parse_utc(text: str) -> datetime:
    return datetime.fromisoformat(text)


def slots_table(slots: Iterable[str], tz: str, title: str | None = None) -> Table:
    """UTC instants (`...Z`) shown in `tz` and in UTC, numbered."""
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column(f"local ({tz})", no_wrap=True)
    table.add_column("UTC", no_wrap=True)
    for i, slot in enumerate(slots, 1):
        table.add_row(str(i), local_text(parse_utc(slot), tz), slot)
    return table


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table()
    for name in ("SLUG", "SCHEDULE", "TIMEZONE", "AGENT", "ENABLED", "NEXT FIRE (UTC)"):
        table.add_column(name, overflow="fold")
    for job in jobs:
        table.add_row(
            job["slug"],
            job["schedule"],
            job["timezone"],
            job["agent"],
            "yes" if job["enabled"] else "no",
            job.get("next_fire") or "-",
        )
    return table


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
        ("sandbox", sandbox["backend"] + (f" ({sandbox['image']})" if sandbox.get("image") else "")),
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
