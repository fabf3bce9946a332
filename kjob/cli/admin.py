"""The security commands: `token` (create, list, revoke), `secret` (set, list, delete, keygen),
`audit` and `quota`. Each talks to the gateway as the CLI's token (docs/security.md)."""

from __future__ import annotations

import getpass
import sys
from typing import Annotated, Any, Optional, get_args

import typer

from kjob.cli.output import Col, Format, WideOpt, api, dump, print_json, print_table, say, when
from kjob.errors import InvalidInput
from kjob.model.secrets import check_name
from kjob.model.views import Role

OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="table for people, json for programs")]
TenantOpt = Annotated[
    Optional[str], typer.Option(help="another tenant (admins of the admin tenant only) [default: your token's]")
]


# --- tokens ------------------------------------------------------------------------------------

token_app = typer.Typer(help="API tokens (admin): create, list, revoke.", no_args_is_help=True)


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option(help=f"one of {', '.join(get_args(Role))}")],
    tenant: TenantOpt = None,
    name: Annotated[str, typer.Option(help="a note for people, e.g. 'ci deploys'")] = "",
    output: OutputOpt = Format.table,
) -> None:
    """Create a token. Its secret is printed once, alone on stdout: store it now."""
    with api() as kjob:
        token = kjob.tokens.create(role, name=name, tenant=tenant)  # type: ignore[arg-type]
    if output is Format.json:
        print_json(dump(token))
        return
    typer.echo(f"created token {token.id} (tenant {token.tenant}, role {token.role}); "
               "its secret is shown only this once:", err=True)
    say(token.secret)


@token_app.command("list")
def token_list(tenant: TenantOpt = None, output: OutputOpt = Format.table, wide: WideOpt = False) -> None:
    """The tenant's tokens (never their secrets), revoked ones included."""
    with api() as kjob:
        tokens = kjob.tokens.list(tenant=tenant)
    if output is Format.json:
        print_json(dump(tokens))
        return
    rows = [[t.id, t.tenant, t.role, t.name or None, when(t.created_at, wide), when(t.revoked_at, wide)]
            for t in tokens]
    columns = [Col("ID"), Col("TENANT", flex=1), Col("ROLE"), Col("NAME", flex=1), Col("CREATED (UTC)"),
               Col("REVOKED (UTC)")]
    print_table(columns, rows, wide=wide)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="the token's id (see `kjob token list`)")],
    tenant: TenantOpt = None,
) -> None:
    """Revoke a token at once."""
    with api() as kjob:
        kjob.tokens.revoke(token_id, tenant=tenant)
    say(f"revoked token {token_id}")


# --- secrets -----------------------------------------------------------------------------------

secret_app = typer.Typer(help="Secrets jobs reference from sandbox.env as \"secret:NAME\".", no_args_is_help=True)


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
    check_name(name)  # before reading the value, which may be typed at a prompt
    value = read_value()
    if not value:
        raise InvalidInput("no value on stdin; pipe it in, e.g. `printf %s \"$TOKEN\" | kjob secret set NAME`", "value")
    with api() as kjob:
        kjob.secrets.set(name, value)
    say(f"secret {name} set; reference it in a job as sandbox.env VAR = \"secret:{name}\"")


@secret_app.command("list")
def secret_list(output: OutputOpt = Format.table, wide: WideOpt = False) -> None:
    """The tenant's secrets (names only)."""
    with api() as kjob:
        secrets = kjob.secrets.list()
    if output is Format.json:
        print_json(dump(secrets))
    elif not secrets:
        say("no secrets yet; add one with `kjob secret set NAME` (value on stdin)")
    else:
        rows = [[s.name, when(s.created_at, wide), when(s.updated_at, wide)] for s in secrets]
        print_table([Col("NAME"), Col("CREATED (UTC)"), Col("UPDATED (UTC)")], rows, wide=wide)


@secret_app.command("delete")
def secret_delete(name: Annotated[str, typer.Argument(help="the secret's name")]) -> None:
    """Delete a secret (refused while jobs reference it)."""
    with api() as kjob:
        kjob.secrets.delete(name)
    say(f"deleted secret {name}")


@secret_app.command("keygen")
def secret_keygen() -> None:
    """Print a new key for KJOB_SECRET_KEY (give every node the same one)."""
    from kjob.store.secrets import generate_key  # the store's imports: not at every command's start

    say(generate_key())


# --- audit and quotas ----------------------------------------------------------------------------


def audit(
    slug: Annotated[Optional[str], typer.Option(help="only what happened to this job")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="how many, newest first")] = 50,
    output: OutputOpt = Format.table,
    wide: WideOpt = False,
) -> None:
    """Who changed what in your tenant, newest first."""
    with api() as kjob:
        entries = kjob.audit.list(slug=slug, limit=limit)
    if output is Format.json:
        print_json(dump(entries))
    elif not entries:
        say("nothing in the audit log" + (f" about {slug}" if slug else ""))
    else:
        rows = [[when(e.at, wide), e.actor, e.action, e.target, _change(e.change)] for e in entries]
        columns = [Col("AT (UTC)"), Col("WHO", flex=2, min=14), Col("ACTION"), Col("TARGET", flex=2, min=14),
                   Col("CHANGE", flex=1)]
        print_table(columns, rows, wide=wide)


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
    with api() as kjob:
        view = kjob.quotas.get()
    if output is Format.json:
        print_json(dump(view))
        return
    limits, usage = view.limits, view.usage
    rows = [
        ["jobs", usage.jobs, limits.max_jobs],
        ["concurrent runs", usage.concurrent_runs, limits.max_concurrent_runs or "no limit"],
        ["run-now per minute", usage.run_now_last_minute, limits.run_now_per_minute],
        ["minimum schedule interval", "", f"{limits.min_interval_s:g}s"],
        ["agent cost today (USD)", f"{usage.cost_usd_today:.2f}", limits.max_cost_usd_per_day or "no cap"],
    ]
    print_table([Col(f"QUOTA ({view.tenant})"), Col("USED", right=True), Col("LIMIT", right=True)], rows)


def register(app: typer.Typer) -> None:
    app.add_typer(token_app, name="token")
    app.add_typer(secret_app, name="secret")
    app.command()(audit)
    app.command()(quota)
