"""The dashboard's security rules against the gateway app on a real database, without a browser:
every action refuses a POST without the session's CSRF token, the login cannot be forged or
redirected off-site, a revoked token ends its session, and the headers hold."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
from starlette.routing import Mount, Route

from kjob.gateway.app import create_app
from kjob.gateway.ui.session import COOKIE, LOGIN_COOKIE, csrf_token
from tests.telemetry.conftest import spans  # noqa: F401 (fixture)
from tests.security.conftest import AUDIENCE, issuer, job_body, make_state, published, settings_for  # noqa: F401 (fixtures)


def ui_app(app: Any) -> Any:
    return next(r.app for r in app.routes if isinstance(r, Mount) and r.path == "/ui")


def client(app: Any, cookie: str | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://kjob.test", cookies={COOKIE: cookie} if cookie else None)


async def make_ui(make_state, role: str = "admin", **settings: Any):  # noqa: F811
    state = make_state(**settings)
    app = create_app(state)
    _, token = await state.tokens.create("acme", role, "ui test")
    api = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kjob.test",
                            headers={"Authorization": f"Bearer {token}"})
    return state, app, token, api


async def test_every_action_refuses_a_post_without_the_csrf_token(make_state, published) -> None:  # noqa: F811
    state, app, token, api = await make_ui(make_state)
    assert (await api.post("/v1/jobs", json=job_body("nightly"))).status_code == 201
    posts = [r.path for r in ui_app(app).routes if isinstance(r, Route) and "POST" in (r.methods or ())]
    assert len(posts) >= 7, posts  # run, pause, resume, delete, edit, backfill, logout (and login)
    async with client(app, token) as browser:
        for path in posts:
            if path == "/login":
                continue  # no session yet: its own double-submit check, tested below
            url = "/ui" + path.replace("{slug}", "nightly")
            for form in ({}, {"csrf": ""}, {"csrf": csrf_token("another session's token")}):
                answer = await browser.post(url, data={"note": "x", "confirm": "nightly", **form})
                assert answer.status_code == 403, (url, form, answer.text)
                assert "CSRF" in answer.text
    job = (await api.get("/v1/jobs/nightly")).json()
    assert job["enabled"] is True and published == []
    # ... and with it, the same action goes through (so the refusals above were the CSRF check).
    async with client(app, token) as browser:
        answer = await browser.post("/ui/jobs/nightly/pause", data={"note": "ok", "csrf": csrf_token(token)})
        assert answer.status_code == 303
    assert (await api.get("/v1/jobs/nightly")).json()["paused_note"] == "ok"


async def test_tokenized_url_sets_a_cookie_and_drops_the_token(make_state) -> None:  # noqa: F811
    state, app, token, api = await make_ui(make_state)
    async with client(app) as browser:
        answer = await browser.get(f"/ui/jobs/nightly?token={token}&x=1")
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/jobs/nightly?x=1"
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=lax" in cookie
        assert "Path=/ui" in cookie
        # A bad token: no cookie, and the token is not echoed into the login URL.
        answer = await browser.get("/ui/?token=kjob_bad_bad")
        assert answer.status_code == 303 and "kjob_bad" not in answer.headers["location"]
        assert "kjob_bad" not in answer.headers.get("set-cookie", "")  # at most the old session is cleared


async def test_login_form_needs_its_nonce_and_never_redirects_off_site(make_state) -> None:  # noqa: F811
    state, app, token, api = await make_ui(make_state)
    async with client(app) as browser:
        page = await browser.get("/ui/login?next=//evil.example/x")
        nonce = re.search(r'name="nonce" value="([^"]+)"', page.text).group(1)
        assert browser.cookies[LOGIN_COOKIE] == nonce
        forged = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kjob.test")
        answer = await forged.post("/ui/login", data={"token": token, "nonce": nonce, "next": "/ui/"})
        assert answer.status_code == 403 and COOKIE not in answer.headers.get("set-cookie", "")
        await forged.aclose()
        for target in ("//evil.example/x", "https://evil.example/", "/v1/jobs", "/ui\\..\\x"):
            page = await browser.get("/ui/login")  # a login spends its nonce
            nonce = re.search(r'name="nonce" value="([^"]+)"', page.text).group(1)
            answer = await browser.post("/ui/login", data={"token": token, "nonce": nonce, "next": target})
            assert answer.status_code == 303 and answer.headers["location"] == "/ui/", target


async def test_a_revoked_token_ends_its_session(make_state) -> None:  # noqa: F811
    state, app, token, api = await make_ui(make_state)
    _, viewer = await state.tokens.create("acme", "viewer", "soon revoked")
    token_id = viewer.split("_")[1]
    async with client(app, viewer) as browser:
        assert (await browser.get("/ui/")).status_code == 200
        assert (await api.delete(f"/v1/tokens/{token_id}")).status_code == 204
        answer = await browser.get("/ui/")
        assert answer.status_code == 303
        assert parse_qs(urlparse(answer.headers["location"]).query)["why"] == ["ended"]


async def test_headers_and_frame_ancestors_setting(make_state, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setenv("KJOB_UI_FRAME_ANCESTORS", "'self' https://kanvas.example")
    state, app, token, api = await make_ui(make_state)
    async with client(app, token) as browser:
        for path in ("/ui/", "/ui/static/app.js", "/ui/login", "/ui/jobs/none-such"):
            answer = await browser.get(path)
            csp = answer.headers["content-security-policy"]
            assert "frame-ancestors 'self' https://kanvas.example" in csp, path
            assert "script-src 'self'" in csp and "unsafe" not in csp, path
            assert answer.headers["x-content-type-options"] == "nosniff"
        assert (await browser.get("/ui/jobs/none-such")).status_code == 404
    assert state.settings.ui_frame_ancestors == "'self' https://kanvas.example"


async def test_delete_asks_for_the_slug_and_needs_an_editor(make_state) -> None:  # noqa: F811
    state, app, token, api = await make_ui(make_state)
    assert (await api.post("/v1/jobs", json=job_body("nightly"))).status_code == 201
    _, operator = await state.tokens.create("acme", "operator", "ui test")
    async with client(app, operator) as browser:
        answer = await browser.post("/ui/jobs/nightly/delete", data={"confirm": "nightly", "csrf": csrf_token(operator)})
        assert answer.status_code == 403 and "editor" in answer.text
        page = await browser.get("/ui/jobs/nightly")
        assert "Run now" in page.text and "Delete…" not in page.text and "Edit as TOML" not in page.text
    async with client(app, token) as browser:
        answer = await browser.post("/ui/jobs/nightly/delete", data={"confirm": "nightl", "csrf": csrf_token(token)})
        assert answer.status_code == 422 and "type the job" in answer.text
        assert (await api.get("/v1/jobs/nightly")).status_code == 200
        answer = await browser.post("/ui/jobs/nightly/delete", data={"confirm": "nightly", "csrf": csrf_token(token)})
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/?done=deleted"
    assert (await api.get("/v1/jobs/nightly")).status_code == 404
    audit = (await api.get("/v1/audit")).json()
    assert audit[0]["action"] == "job.delete"


async def test_a_jwt_logs_in_the_same_way_and_its_expiry_ends_the_session(make_state, issuer) -> None:  # noqa: F811
    state = make_state(oidc_issuer=issuer.url, oidc_audience=AUDIENCE, oidc_jwks_refetch_s=0)
    app = create_app(state)
    jwt = issuer.token(tenant="acme", roles=["operator"], sub="alice")
    async with client(app) as browser:
        answer = await browser.get(f"/ui/?token={jwt}")
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/"
        page = await browser.get("/ui/")
        assert page.status_code == 200 and "acme" in page.text and "operator" in page.text
    expired = issuer.token(exp=1)
    async with client(app, expired) as browser:
        answer = await browser.get("/ui/")
        assert answer.status_code == 303 and "why=ended" in answer.headers["location"]


async def test_a_login_url_token_reaches_no_trace_span(make_state, spans) -> None:  # noqa: F811
    state, app, token, api = await make_ui(make_state)
    async with client(app) as browser:
        answer = await browser.get(f"/ui/jobs/x?token={token}&keep=1")
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/jobs/x?keep=1"
        assert (await browser.get("/ui/jobs/x")).status_code == 404  # the cookie works
    recorded = spans.get_finished_spans()
    assert any("/ui" in str(s.attributes) for s in recorded), [s.name for s in recorded]
    secret = token.rsplit("_", 1)[1]
    assert not [s.name for s in recorded if secret in str(s.attributes) or secret in s.name]


async def test_cookie_settings(make_state) -> None:  # noqa: F811
    for samesite, secure in (("strict", False), ("none", True)):
        state, app, token, api = await make_ui(make_state, ui_cookie_samesite=samesite, ui_session_s=600)
        async with client(app) as browser:
            cookie = (await browser.get(f"/ui/?token={token}")).headers["set-cookie"]
        assert f"SameSite={samesite}" in cookie and "Max-Age=600" in cookie
        assert ("Secure" in cookie) is secure  # browsers drop SameSite=None cookies that are not Secure
