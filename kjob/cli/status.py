"""`kjob status`: nodes, the ticker leader, stream health."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kjob.cli.output import Col, Format, WideOpt, api, dump, print_json, print_table, say


def status(
    output: Annotated[Format, typer.Option("--output", "-o", help="table for people, json for programs")] = Format.table,
    wide: WideOpt = False,
) -> None:
    """Show the cluster: nodes and their roles, the ticker leader, stream and consumer backlog."""
    with api() as kjob:
        view = kjob.status()
    if output is Format.json:
        print_json(dump(view))
        return
    leader = view.leader
    if leader:
        say(f"ticker leader: {leader.node} (lease revision {leader.revision}, renewed {leader.lease_age_s:.1f}s ago)")
    else:
        say("ticker leader: none: no node runs the ticker role, or an election is under way")
    say("")
    _nodes(view.nodes, wide)
    say("")
    _streams(view.streams, wide)


def _nodes(nodes: list[dict[str, Any]], wide: bool) -> None:
    rows = []
    for n in nodes:
        boxes = [f"{k} ({', '.join(f'{a}={b}' for a, b in v.items())})" if v and wide else k
                 for k, v in n.get("sandboxes", {}).items()]
        boxes += [f"{k}: unavailable" for k in n.get("sandboxes_unavailable", {})]
        rows.append([n["node"], ",".join(n.get("roles", [])), "yes" if n.get("leading") else "",
                     ", ".join(boxes) or None, n.get("seen", "") if wide else n.get("seen", "")[11:19]])
    print_table([Col("NODE", flex=1), Col("ROLES", flex=1), Col("LEADING"), Col("SANDBOXES", flex=1),
                 Col("SEEN (UTC)")], rows, wide=wide, title="nodes")


def _streams(streams: dict[str, dict[str, Any]], wide: bool) -> None:
    headers = (["STREAM", "MESSAGES", "REPLICAS", "CONSUMER", "PENDING", "ACK PENDING", "REDELIVERED"] if wide
               else ["STREAM", "MSGS", "REPL", "CONSUMER", "PENDING", "UNACKED", "REDELIV"])
    rows = []
    for name, s in streams.items():
        if not s.get("exists"):
            rows.append([name, "missing", "", "", "", "", ""])
            continue
        c = s.get("consumer") or {}
        rows.append([name, s["messages"], s["replicas"], c.get("name"), c.get("pending"), c.get("ack_pending"),
                     c.get("redelivered")])
    columns = [Col(h, flex=int(h in ("STREAM", "CONSUMER")), right=i in (1, 2, 4, 5, 6)) for i, h in enumerate(headers)]
    print_table(columns, rows, wide=wide, title="streams")


def register(app: typer.Typer) -> None:
    app.command()(status)
