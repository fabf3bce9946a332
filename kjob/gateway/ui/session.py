"""The dashboard's browser session: a token in, a cookie out, and CSRF tokens for every form.

- **Login.** A tokenized URL (`/ui/...?token=<API token or JWT>`, what `kjob up` prints) or
  the login form's pasted token is verified with `kjob.gateway.auth.principal_of_token`, the
  function `/v1` uses for its bearer header. The answer sets the `kjob_session` cookie
  (HttpOnly, SameSite per `KJOB_UI_COOKIE_SAMESITE`, Path=/ui, Secure over HTTPS) and
  redirects to the same page without the token, so the token is in no address bar, history
  entry or Referer after login.
- **Every request** verifies the cookie's token again, so a revoked token (or an expired JWT)
  ends the session at its next click, and the tenant and role are the token's, as on /v1.
  The cookie holds the token itself, out of reach of scripts (HttpOnly): no session table to
  replicate between gateway nodes, and nothing the session can do that the token could not.
- **CSRF.** Each form carries `csrf`, an HMAC of the session token (a synchronizer token
  that needs no server state: another site can neither read the cookie nor compute it). Every
  POST checks it before anything else; the login form, which has no session yet, checks a
  double-submit pair (`kjob_login` cookie = form field) instead.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from urllib.parse import parse_qsl, urlencode

from fastapi import Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from kjob.config import Settings

#: Where `TokenFromQuery` leaves a tokenized URL's token for the dashboard.
SCOPE_KEY = "kjob.ui.token"

COOKIE = "kjob_session"
LOGIN_COOKIE = "kjob_login"
PATH = "/ui"
_CSRF_CONTEXT = b"kjob-ui-csrf-v1"


def csrf_token(session_token: str) -> str:
    """The CSRF token of a session: the same for every form of the session, unguessable
    without the session's token."""
    mac = hmac.new(session_token.encode(), _CSRF_CONTEXT, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def csrf_ok(session_token: str, sent: str | None) -> bool:
    return bool(sent) and hmac.compare_digest(csrf_token(session_token), sent or "")


def new_login_nonce() -> str:
    return secrets.token_urlsafe(24)


def _secure(request: Request, settings: Settings) -> bool:
    # SameSite=None cookies are dropped by browsers unless Secure.
    return request.url.scheme == "https" or settings.ui_cookie_samesite == "none"


def set_session(response: Response, request: Request, settings: Settings, token: str) -> None:
    response.set_cookie(COOKIE, token, max_age=settings.ui_session_s, path=PATH, httponly=True,
                        samesite=settings.ui_cookie_samesite, secure=_secure(request, settings))
    response.delete_cookie(LOGIN_COOKIE, path=PATH)


def set_login_nonce(response: Response, request: Request, settings: Settings, nonce: str) -> None:
    response.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, path=PATH, httponly=True,
                        samesite=settings.ui_cookie_samesite, secure=_secure(request, settings))


def end_session(response: Response) -> None:
    response.delete_cookie(COOKIE, path=PATH)


def safe_next(target: str | None) -> str:
    """Where to go after login: a dashboard path only (never another site, never `//host`)."""
    if not target or not target.startswith(PATH + "/") or target.startswith("//") or "\\" in target:
        return PATH + "/"
    return target


def without_token(request: Request) -> str:
    """The request's path and query with `token` removed: where the tokenized URL redirects."""
    query = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
    return request.url.path + (f"?{urlencode(query)}" if query else "")


class TokenFromQuery:
    """Takes `token` out of a dashboard URL's query before anything else sees the request (the
    tracing middleware records the query in every span) and leaves it in the ASGI scope for
    the dashboard, which exchanges it for the cookie. The gateway installs this outermost."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PATH) and b"token=" in scope.get("query_string", b""):
            pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
            token = next((v for k, v in pairs if k == "token"), None)
            rest = urlencode([(k, v) for k, v in pairs if k != "token"])
            scope = {**scope, "query_string": rest.encode("latin-1"), SCOPE_KEY: token}
        await self.app(scope, receive, send)
