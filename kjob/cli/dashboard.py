"""`kjob dashboard`: print (or open) the URL that logs a browser in to the web dashboard."""

from __future__ import annotations

import webbrowser

import typer

from kjob.client._config import resolve
from kjob.config import Settings
from kjob.errors import Unauthorized


def dashboard(
    open_browser: bool = typer.Option(False, "--open", help="also open it in the default browser"),
) -> None:
    """Print the dashboard URL of the gateway the CLI talks to, with the CLI's token in it once:
    the browser trades it for a session cookie and drops it from the address bar. Keep the URL
    as private as the token."""
    target = resolve(settings=Settings())
    if not target.token:
        raise Unauthorized(f"no token: set KJOB_TOKEN or run `kjob up` (it writes {target.token_source})")
    from kjob.gateway.ui import dashboard_url  # the gateway's imports (FastAPI): only for this command

    url = dashboard_url(target.url, target.token)
    typer.echo(url)
    if open_browser:
        webbrowser.open(url)


def register(app: typer.Typer) -> None:
    app.command()(dashboard)
