"""The security commands: `token` (create, list, revoke), `secret` (set, list, delete, keygen),
`audit` and `quota`. Each talks to the gateway as the CLI's token (docs/security.md)."""

from __future__ import annotations

import getpass
import re
import sys
from typing import Annotated, Any, Optional
from urllib.parse import quote

import typer
from rich.table import Table

from kjob.cli.client import ApiClient, resolve
from kjob.cli.output import Format, console, print_json, say
from kjob.config import Settings
from kjob.errors import InvalidInput
from kjob.model.job import SLUG_PATTERN
from kjob.store.secrets import check_name, generate_key
from kjob.store.tokens import ROLES

OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="table for people, json for programs")]
TenantOpt = Annotated[
    Optional[str], typer.Option(help="another tenant (admins of the admin tenant only) [default: your token's]")
]


def _client() -> ApiClient:
    return ApiClient(resolve(Settings()))


def _table(columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table()
    for name in columns:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row))
    return table


def _short(instant: str | None) -> str | None:
    return instant[:19].replace("T", " ") if instant else None


# --- tokens ------------------------------------------------------------------------------------

token_app = typer.Typer(help="API tokens (admin): create, list, revoke.", no_args_is_help=True)


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option(help=f"one of {', '.join(ROLES)}")],
    tenant: TenantOpt = None,
    name: Annotated[str, typer.Option(help="a note for people, e.g. 'ci deploys'")] = "",
    output: OutputOpt = Format.table,
) -> None:
    """Create a token. Its secret is printed once, alone on stdout: store it now."""
    body: dict[str, Any] = {"role": role, "name": name, **({"tenant": tenant} if tenant else {})}
    with _client() as api:
        token = api.request("POST", "/v1/tokens", json=body)
    if output is Format.json:
        print_json(token)
        return
    typer.echo(f"created token {token['id']} (tenant {token['tenant']}, role {token['role']}); "
               "its secret is shown only this once:", err=True)
    say(token["secret"])


@token_app.command("list")
def token_list(tenant: TenantOpt = None, output: OutputOpt = Format.table) -> None:
    """The tenant's tokens (never their secrets), revoked ones included."""
    with _client() as api:
        tokens = api.request("GET", "/v1/tokens", params={"tenant": tenant} if tenant else None)
    if output is Format.json:
        print_json(tokens)
        return
    rows = [[t["id"], t["tenant"], t["role"], t["name"] or None, _short(t["created_at"]), _short(t["revoked_at"])]
            for t in tokens]
    console().print(_table(["ID", "TENANT", "ROLE", "NAME", "CREATED (UTC)", "REVOKED (UTC)"], rows))


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="the token's id (see `kjob token list`)")],
    tenant: TenantOpt = None,
) -> None:
    """Revoke a token at once."""
    with _client() as api:
        api.request("DELETE", f"/v1/tokens/{quote(token_id, safe='')}", params={"tenant": tenant} if tenant else None)
    say(f"revoked token {token_id}")


# --- secrets -----------------------------------------------------------------------------------

secret_app = typer.Typer(help="Secrets jobs reference from sandbox.env as \"secret:NAME\".", no_args_is_help=True)


def _name(name: str) -> str:
    check_name(name)  # here, not only at the server: a '/' would reach another route
    return quote(name, safe="")


def read_value() -> str:
    """The secret from stdin (a prompt without echo on a terminal), minus one trailing newline,
    so `echo "$TOKEN" | kjob secret set api-key` stores the token itself."""
    value = getpass.getpass("value (not echoed): ") if sys.stdin.isatty() else sys.stdin.read()
    if value.endswith("\r\n"):
        return value[:-2]
    return value[:-1] if value.endswith("\n") else value


@secret_app.command("set")
def secret_set(name: Annotated[str, typer.Argument(help="letters, digits, '_', '.', '-'")]) -> None:
    """Create or replace a secret; the value is read from stdin, never from the command line."""
    path = f"/v1/secrets/{_name(name)}"
    value = read_value()
    if not value:
        raise InvalidInput("no value on stdin; pipe it in, e.g. `printf %s \"$TOKEN\" | kjob secret set NAME`", "value")
    with _client() as api:
        api.request("PUT", path, json={"value": value})
    say(f"secret {name} set; reference it in a job as sandbox.env VAR = \"secret:{name}\"")


@secret_app.command("list")
def secret_list(output: OutputOpt = Format.table) -> None:
    """The tenant's secrets (names only)."""
    with _client() as api:
        secrets = api.request("GET", "/v1/secrets")
    if output is Format.json:
        print_json(secrets)
    elif not secrets:
        say("no secrets yet; add one with `kjob secret set NAME` (value on stdin)")
    else:
        rows = [[s["name"], _short(s["created_at"]), _short(s["updated_at"])] for s in secrets]
        console().print(_table(["NAME", "CREATED (UTC)", "UPDATED (UTC)"], rows))


@secret_app.command("delete")
def secret_delete(name: Annotated[str, typer.Argument(help="the secret's name")]) -> None:
    """Delete a secret (refused while jobs reference it)."""
    with _client() as api:
        api.request("DELETE", f"/v1/secrets/{_name(name)}")
    say(f"deleted secret {name}")


@secret_app.command("keygen")
def secret_keygen() -> None:
    """Print a new key for KJOB_SECRET_KEY (give every node the same one)."""
    say(generate_key())


# --- audit and quotas ----------------------------------------------------------------------------


def audit(
    slug: Annotated[Optional[str], typer.Option(help="only what happened to this job")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="how many, newest first")] = 50,
    output: OutputOpt = Format.table,
) -> None:
    """Who changed what in your tenant, newest first."""
    if slug is not None and not re.match(SLUG_PATTERN, slug):
        raise InvalidInput(f"{slug!r} cannot be a job's slug: slugs are lowercase letters, digits and '-'", "slug")
    params: dict[str, Any] = {"limit": limit, **({"slug": slug} if slug else {})}
    with _client() as api:
        entries = api.request("GET", "/v1/audit", params=params)
    if output is Format.json:
        print_json(entries)
    elif not entries:
        say("nothing in the audit log" + (f" about {slug}" if slug else ""))
    else:
        rows = [[_short(e["at"]), e["actor"], e["action"], e["target"], _change(e.get("change"))] for e in entries]
        console().print(_table(["AT (UTC)", "WHO", "ACTION", "TARGET", "CHANGE"], rows))


def _change(change: dict[str, Any] | None) -> str | None:
    """A short summary for the table: the changed fields, or the few keys recorded."""
    if not change:
        return None
    if all(isinstance(v, dict) and set(v) == {"from", "to"} for v in change.values()):
        return ", ".join(sorted(change))
    if "spec" in change:
        return "(whole job)"
    return ", ".join(f"{k}={v}" for k, v in change.items())


def quota(output: OutputOpt = Format.table) -> None:
    """Your tenant's quotas and what it uses of them now."""
    with _client() as api:
        view = api.request("GET", "/v1/quotas")
    if output is Format.json:
        print_json(view)
        return
    limits, usage = view["limits"], view["usage"]
    rows = [
        ["jobs", usage["jobs"], limits["max_jobs"]],
        ["concurrent runs", usage["concurrent_runs"], limits["max_concurrent_runs"] or "no limit"],
        ["run-now per minute", usage["run_now_last_minute"], limits["run_now_per_minute"]],
        ["minimum schedule interval", "", f"{limits['min_interval_s']:g}s"],
        ["agent cost today (USD)", f"{usage.get('cost_usd_today', 0):.2f}", limits.get("max_cost_usd_per_day") or "no cap"],
    ]
    console().print(_table([f"QUOTA ({view['tenant']})", "USED", "LIMIT"], rows))


def register(app: typer.Typer) -> None:
    app.add_typer(token_app, name="token")
    app.add_typer(secret_app, name="secret")
    app.command()(audit)
    app.command()(quota)
