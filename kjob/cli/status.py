"""`kjob status`: nodes, the ticker leader, stream health."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from kjob.cli.client import ApiClient, resolve
from kjob.cli.output import Format, console, print_json, say
from kjob.config import Settings


def status(
    output: Annotated[Format, typer.Option("--output", "-o", help="table for people, json for programs")] = Format.table,
) -> None:
    """Show the cluster: nodes and their roles, the ticker leader, stream and consumer backlog."""
    with ApiClient(resolve(Settings())) as api:
        data = api.status()
    if output is Format.json:
        print_json(data)
        return
    out = console()
    leader = data.get("leader")
    if leader:
        say(f"ticker leader: {leader['node']} (lease revision {leader['revision']}, renewed {leader['lease_age_s']:.1f}s ago)")
    else:
        say("ticker leader: none: no node runs the ticker role, or an election is under way")
    out.print(_nodes(data["nodes"]))
    out.print(_streams(data["streams"]))


def _nodes(nodes: list[dict[str, Any]]) -> Table:
    table = Table(title="nodes", title_justify="left")
    for name in ("NODE", "ROLES", "LEADING", "SANDBOXES", "SEEN"):
        table.add_column(name, overflow="fold")
    for n in nodes:
        boxes = [f"{k} ({', '.join(f'{a}={b}' for a, b in v.items())})" if v else k for k, v in n.get("sandboxes", {}).items()]
        boxes += [f"{k}: unavailable" for k in n.get("sandboxes_unavailable", {})]
        table.add_row(n["node"], ",".join(n.get("roles", [])), "yes" if n.get("leading") else "",
                      "\n".join(boxes) or "-", n.get("seen", "")[11:19])
    return table


def _streams(streams: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="streams", title_justify="left")
    for name in ("STREAM", "MESSAGES", "REPLICAS", "CONSUMER", "PENDING", "ACK PENDING", "REDELIVERED"):
        table.add_column(name)
    for name, s in streams.items():
        if not s.get("exists"):
            table.add_row(name, "missing", "", "", "", "", "")
            continue
        c = s.get("consumer") or {}
        table.add_row(name, str(s["messages"]), str(s["replicas"]), c.get("name", "-"), str(c.get("pending", "-")),
                      str(c.get("ack_pending", "-")), str(c.get("redelivered", "-")))
    return table


def register(app: typer.Typer) -> None:
    app.command()(status)
