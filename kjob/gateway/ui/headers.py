"""Security headers on every dashboard answer (pages, the live log, static files, errors).

The CSP allows only the dashboard's own script and style files: no inline script or style,
no `eval`, nothing from another origin; forms post only back to the dashboard. Framing is
limited to `frame-ancestors` (`KJOB_UI_FRAME_ANCESTORS`, default `'self'`), so kanvas can embed
the dashboard and other sites cannot (clickjacking). A pure ASGI middleware, so the live log
keeps streaming.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def content_security_policy(frame_ancestors: str) -> str:
    return "; ".join((
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        f"frame-ancestors {frame_ancestors}",
    ))


class SecurityHeaders:
    def __init__(self, app: ASGIApp, frame_ancestors: str) -> None:
        self.app = app
        self.headers = [
            (b"content-security-policy", content_security_policy(frame_ancestors).encode()),
            (b"x-content-type-options", b"nosniff"),
            # Page URLs carry run ids and slugs: keep them from other sites' logs.
            (b"referrer-policy", b"same-origin"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, with_headers)
