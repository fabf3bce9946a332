"""The web dashboard (RFC F7), served by the gateway at `/ui` (docs/dashboard.md)."""

from __future__ import annotations

from fastapi import FastAPI

from kjob.gateway.state import GatewayState

PREFIX = "/ui"


def mount(app: FastAPI, state: GatewayState) -> None:
    """Serve the dashboard under `/ui` of the gateway `app`."""
    from kjob.gateway.ui.app import create_ui

    app.mount(PREFIX, create_ui(state), name="ui")


def dashboard_url(api_url: str, token: str) -> str:
    """The URL that logs a browser in once (the token is exchanged for a cookie and dropped)."""
    return f"{api_url.rstrip('/')}{PREFIX}/?token={token}"
