"""The web dashboard (RFC F7), served by the gateway at `/ui` (docs/dashboard.md)."""

from __future__ import annotations

from fastapi import FastAPI

from kjob.gateway.state import GatewayState

PREFIX = "/ui"


def mount(app: FastAPI, state: GatewayState) -> None:
    """Serve the dashboard under `/ui` of the gateway `app`. Call it after tracing is set up:
    a login URL's token is taken out of the query before anything records the request."""
    from kjob.gateway.ui.app import create_ui
    from kjob.gateway.ui.session import TokenFromQuery

    app.mount(PREFIX, create_ui(state), name="ui")
    # Around the whole built stack, tracing's middleware included (it wraps the stack the same
    # way), so no span ever records the token.
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: TokenFromQuery(build())  # type: ignore[method-assign]


def dashboard_url(api_url: str, token: str) -> str:
    """The URL that logs a browser in once (the token is exchanged for a cookie and dropped)."""
    return f"{api_url.rstrip('/')}{PREFIX}/?token={token}"
