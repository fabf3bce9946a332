"""`kjob up`, `kjob server` and `kjob db`: the commands that run kjob rather than talk to it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from kjob.config import ROLES, Settings
from kjob.errors import KjobError, ServerError

log = logging.getLogger(__name__)

err_console = Console(stderr=True)
console = Console()


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(1)


def _setup_logging(settings: Settings) -> None:
    """Logs (KJOB_LOG_FORMAT, KJOB_LOG_LEVEL), and traces and metrics export (OTEL_*), for the
    whole process: kjob.telemetry configures them in one place."""
    from kjob import telemetry

    try:
        telemetry.setup(settings)
    except KjobError as err:
        _fail(str(err))


def _run_until_signal(main) -> None:
    """Run `main(stop)` until it returns or SIGINT/SIGTERM sets `stop`."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


def register(app: typer.Typer) -> None:
    db = typer.Typer(help="Database schema.", no_args_is_help=True)
    app.add_typer(db, name="db")

    @app.command()
    def up(
        home: Optional[Path] = typer.Option(None, help="Where kjob keeps its data (KJOB_HOME)."),
        port: Optional[int] = typer.Option(None, help="API port (KJOB_PORT, default 8742; 0 = any free port)."),
        dbus: bool = typer.Option(False, "--dbus", help="Also serve dev.koder.scheduler on D-Bus (KJOB_DBUS__ENABLED)."),
    ) -> None:
        """Run everything in one process: API, ticker, executor, dispatcher. Starts embedded NATS and
        PostgreSQL under the kjob home unless KJOB_NATS_URL / KJOB_DATABASE_URL point elsewhere."""
        overrides = {}
        if home is not None:
            overrides["home"] = home
            os.environ["KJOB_HOME"] = str(home)
        if port is not None:
            overrides["port"] = port
        if dbus:
            overrides["dbus"] = {"enabled": True}
        try:
            settings = Settings(**overrides)
        except Exception as err:
            _fail(f"bad configuration: {err}")
        _setup_logging(settings)
        try:
            _run_until_signal(lambda stop: _up(settings, stop))
        except KjobError as err:
            _fail(str(err))
        console.print("kjob stopped.")

    @app.command()
    def server(
        roles: str = typer.Option(",".join(ROLES), help="Comma-separated roles: " + ", ".join(ROLES)),
    ) -> None:
        """Run chosen roles against external NATS and PostgreSQL (KJOB_NATS_URL, KJOB_DATABASE_URL)."""
        from kjob.node import Node, parse_roles

        settings = Settings()
        try:
            chosen = parse_roles(roles)
        except KjobError as err:
            _fail(str(err))
        if not settings.nats_url or not settings.database_url:
            _fail("kjob server needs KJOB_NATS_URL and KJOB_DATABASE_URL; for a single machine, use `kjob up`")
        _setup_logging(settings)
        node = Node(settings=settings, roles=chosen, nats_url=settings.nats_url, database_url=settings.database_url,
                    on_ready=lambda url: err_console.print(f"kjob node running roles {', '.join(sorted(chosen))}"
                                                           + (f"; API at {url}" if url else "")))
        try:
            _run_until_signal(node.run)
        except KjobError as err:
            _fail(str(err))

    @db.command("upgrade")
    def db_upgrade() -> None:
        """Apply the database migrations (KJOB_DATABASE_URL, or the embedded database of KJOB_HOME)."""
        from kjob.store.database import migrate

        settings = Settings()

        async def main(stop: asyncio.Event) -> None:
            async with _database(settings) as url:
                revision = await migrate(url)
                console.print(f"database at revision {revision}")

        try:
            _run_until_signal(main)
        except KjobError as err:
            _fail(str(err))

    @db.command("admin-token")
    def db_admin_token(
        file: Path = typer.Option(..., "--file", "-f", help="where to write the token (mode 0600)"),
    ) -> None:
        """Write an admin token of the admin tenant into FILE, straight through the database
        (KJOB_DATABASE_URL): the first credential of a production cluster, from which
        `kjob token create` makes the others. Reuses FILE's token while it is still valid."""
        from kjob.store.database import create_engine, migrate
        from kjob.store.tokens import TokenStore, ensure_admin_token

        settings = Settings()
        if not settings.database_url:
            _fail("kjob db admin-token needs KJOB_DATABASE_URL; `kjob up` writes its own token under KJOB_HOME")

        async def main(stop: asyncio.Event) -> None:
            engine = create_engine(settings.database_url)
            try:
                await migrate(engine)
                await ensure_admin_token(TokenStore(engine), file)
            finally:
                await engine.dispose()
            console.print(f"admin token in {file}; use it with KJOB_TOKEN=$(cat {file})", highlight=False)

        try:
            _run_until_signal(main)
        except KjobError as err:
            _fail(str(err))


def _credentials(settings: Settings):
    """The embedded servers' passwords (created on first use; see kjob.embedded.credentials)."""
    from kjob.embedded.credentials import EmbeddedCredentials

    return EmbeddedCredentials.ensure(settings.credentials_file)


@contextlib.asynccontextmanager
async def _nats(settings: Settings):
    """Yields each NATS user's URL: the configured server's for all, or the embedded one's,
    where each role logs in as itself."""
    from kjob.embedded.nats import NATS_USERS, EmbeddedNats

    if settings.nats_url:
        yield dict.fromkeys(NATS_USERS, settings.nats_url)
        return
    server = EmbeddedNats(settings.home / "nats", port=_saved_port(settings.home / "nats.port", 4222),
                          users=_credentials(settings).nats)
    await asyncio.to_thread(_start_on_a_free_port, server)
    (settings.home / "nats.port").write_text(str(server.port))
    try:
        yield {user: server.url_for(user) for user in NATS_USERS}
    finally:
        await asyncio.to_thread(server.stop)


@contextlib.asynccontextmanager
async def _database(settings: Settings):
    if settings.database_url:
        yield settings.database_url
        return
    from kjob.embedded.postgres import EmbeddedPostgres

    server = EmbeddedPostgres(settings.home / "postgres", password=_credentials(settings).postgres_password)
    await asyncio.to_thread(server.start)
    try:
        yield await asyncio.to_thread(server.ensure_database, "kjob")
    finally:
        await asyncio.to_thread(server.stop)


def _start_on_a_free_port(server, tries: int = 3) -> None:
    """`server.start()`; should another program take its port between the check that it was
    free and the bind (two `kjob up` starting at once), again on a port the OS picks."""
    from kjob.embedded._process import free_port

    for attempt in range(tries):
        try:
            server.start()
            return
        except ServerError as err:
            if "address already in use" not in str(err) or attempt == tries - 1:
                raise
            taken, server.port = server.port, free_port()
            log.warning("the embedded NATS port %d was taken as it started; using %d", taken, server.port)


def _saved_port(path: Path, preferred: int) -> int:
    """The port used last time if it is free, else `preferred` if free, else any free one. A
    port taken meanwhile (another program, another `kjob up`) moves this one, saying so, rather
    than fail the start."""
    from kjob.embedded._process import free_port, port_is_free

    saved = None
    if path.exists():
        with contextlib.suppress(ValueError):
            saved = int(path.read_text())
    if saved is not None:
        if port_is_free(saved):
            return saved
        log.warning("the embedded NATS port %d used last time is taken now; choosing another", saved)
    return preferred if preferred != saved and port_is_free(preferred) else free_port()


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port}" if parts.password else url


async def _up(settings: Settings, stop: asyncio.Event) -> None:
    from kjob.node import Node
    from kjob.store.database import create_engine, migrate
    from kjob.store.tokens import TokenStore, ensure_admin_token

    settings.home.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        with err_console.status("starting NATS (JetStream)…"):
            nats_urls = await stack.enter_async_context(_nats(settings))
        with err_console.status("starting PostgreSQL…"):
            database_url = await stack.enter_async_context(_database(settings))
        with err_console.status("migrating the database…"):
            engine = create_engine(database_url)
            try:
                await migrate(engine)
                await ensure_admin_token(TokenStore(engine), settings.token_file)
            finally:
                await engine.dispose()
        if not settings.secret_key:  # one machine needs no key management: keep the key beside the data
            from kjob.store.secrets import ensure_key_file

            ensure_key_file(settings.secret_key_file)

        def ready(url: str | None) -> None:
            settings.api_url_file.write_text(url or "")
            console.print(f"[bold green]kjob is up[/bold green]  API {url}", highlight=False)
            console.print(f"  token   {settings.token_file}", highlight=False)
            if url:
                from kjob.gateway.ui import dashboard_url

                # soft_wrap: the URL must stay on one line to be clicked or copied.
                console.print(f"  dashboard {dashboard_url(url, settings.token_file.read_text().strip())}",
                              highlight=False, soft_wrap=True)
            if not settings.secret_key:
                console.print(f"  secrets key {settings.secret_key_file} (back it up: stored secrets need it)",
                              highlight=False)
            console.print(f"  data    {settings.home}", highlight=False)
            if not settings.nats_url or not settings.database_url:
                console.print(f"  credentials {settings.credentials_file} (embedded NATS and PostgreSQL)",
                              highlight=False)
            console.print(f"  NATS    {_without_password(nats_urls['api'])}", highlight=False)
            if settings.dbus.enabled:
                console.print(f"  D-Bus   dev.koder.scheduler on the {settings.dbus.bus} bus", highlight=False)
            console.print("  try     kjob create --slug hello --agent shell --schedule '@every 1m' --prompt 'echo hello'",
                          highlight=False)
            console.print("Ctrl-C stops it.", highlight=False)

        node = Node(settings=settings, roles=frozenset(ROLES), nats_url=nats_urls["api"], nats_urls=nats_urls,
                    database_url=database_url, on_ready=ready)
        try:
            await node.run(stop)
        finally:
            with contextlib.suppress(OSError):
                settings.api_url_file.unlink()
