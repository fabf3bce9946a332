"""The dashboard's pages and actions, a FastAPI app the gateway mounts at `/ui`.

Pages are HTML rendered on the server (Jinja2, autoescaped: nothing from a prompt, a log or a
label reaches the page as markup) with one small script (`static/app.js`) for the live log.
Every page and action goes through `kjob.gateway.ui.calls.call`, i.e. the /v1 handlers and
their role checks; actions are plain HTML forms (they work from the keyboard and without the
script), POSTed with the session's CSRF token and answered with a redirect.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode
from zoneinfo import ZoneInfo

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kjob._time import utcnow
from kjob.errors import Forbidden, InvalidInput, KjobError, NotFound, Unauthorized
from kjob.gateway.auth import principal_of_token
from kjob.gateway.errors import status_for
from kjob.gateway.routes import audit, backfill, jobs, runs, schedules, status
from kjob.gateway.state import GatewayState
from kjob.gateway.ui import present, session
from kjob.gateway.ui.calls import allowed, call
from kjob.gateway.ui.headers import SecurityHeaders
from kjob.store.usage import UsageStore
from kjob.model.job import validation_error
from kjob.model.jobfile import dump_job, load_jobs
from kjob.model.policies import OVERLAP_POLICIES, backfill_slots
from kjob.model.run import RunStatus, dispatch_payload, run_page_url
from kjob.model.schedule import Schedule
from kjob.store.overlap import RERUNNABLE
from kjob.store.tokens import Principal

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
#: Run-history queries in flight for one jobs list (one per job; the pool has room for them).
LIST_CONCURRENCY = 8
#: Messages a redirect after an action may show (`?done=<key>`): fixed texts, never user input.
DONE = {
    "paused": "Paused. No slot runs until it is resumed.",
    "resumed": "Resumed. Slots from now on run; none of the paused ones do.",
    "saved": "Saved.",
    "unchanged": "Nothing changed: the file equals the stored job.",
    "deleted": "Deleted, with its run history.",
    "logged-out": "Logged out.",
}

_env = Environment(
    loader=PackageLoader("kjob.gateway.ui", "templates"),
    autoescape=select_autoescape(["html"], default=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(
    duration=present.duration_words,
    utc=present.utc_short,
    words=present.schedule_words,
    plural=present.plural,
    # Plain JSON text, escaped like any other text (`tojson` writes \u003c for `<`, unreadable).
    json=lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False, default=str),
)
_env.globals.update(local=present.local_text)


class LoginRequired(Exception):
    def __init__(self, target: str, message: str | None = None) -> None:
        self.target = target
        self.message = message


class StartSession(Exception):
    """A tokenized URL whose token is valid: set the cookie, go to the URL without the token."""

    def __init__(self, token: str, target: str) -> None:
        self.token = token
        self.target = target


class Session:
    def __init__(self, request: Request, token: str, principal: Principal) -> None:
        self.request = request
        self.token = token
        self.principal = principal
        self.csrf = session.csrf_token(token)
        self.state: GatewayState = request.app.state.gateway

    async def call(self, handler: Any, **kwargs: Any) -> Any:
        return await call(handler, self.principal, self.state, **kwargs)

    def can(self, handler: Any) -> bool:
        return allowed(handler, self.principal)


def _state(request: Request) -> GatewayState:
    return request.app.state.gateway


async def current(request: Request) -> Session:
    """The request's session. A `token` in the query starts one (and the answer drops it from
    the URL); no or a stale cookie sends the browser to the login page."""
    state = _state(request)
    offered = request.scope.get(session.SCOPE_KEY)
    if offered:
        try:
            await principal_of_token(state, offered)
        except (Unauthorized, Forbidden) as err:
            raise LoginRequired(session.without_token(request), str(err)) from None
        raise StartSession(offered, session.without_token(request))
    token = request.cookies.get(session.COOKIE)
    if not token:
        raise LoginRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    try:
        principal = await principal_of_token(state, token)
    except (Unauthorized, Forbidden) as err:
        raise LoginRequired(request.url.path, f"your session ended: {err}") from None
    return Session(request, token, principal)


async def form_of(request: Request) -> dict[str, str]:
    """An urlencoded form body (all the dashboard's forms are; the body limit applies)."""
    body = (await request.body()).decode("utf-8", errors="replace")
    return dict(parse_qsl(body, keep_blank_values=True))


async def acting(request: Request) -> tuple[Session, dict[str, str]]:
    """The session and form of an action. A POST without the session's CSRF token is refused
    (403) before anything else runs."""
    s = await current(request)
    fields = await form_of(request)
    if not session.csrf_ok(s.token, fields.get("csrf")):
        raise Forbidden("the form's CSRF token is missing or wrong; reload the page and try again")
    return s, fields


def render(s: Session | None, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    request = context.pop("request", None) or s.request
    done = DONE.get(request.query_params.get("done", ""))
    html = _env.get_template(name).render(
        session=s, principal=s.principal if s else None, csrf=s.csrf if s else "", done=done, path=request.url.path,
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers={"Cache-Control": "no-store"})


def see_other(target: str) -> RedirectResponse:
    return RedirectResponse(target, status_code=303)


def _job_url(slug: str, done: str | None = None) -> str:
    return f"/ui/jobs/{quote(slug, safe='')}" + (f"?done={done}" if done else "")


def _dump(model: Any) -> dict[str, Any]:
    return model.model_dump()


def _instant(text: str, tz: str, field: str) -> datetime:
    """A form's instant: ISO 8601 with Z or an offset, or without one in the job's zone."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(f"{text!r} is not an instant; write e.g. 2026-12-01T09:00 or 2026-12-01T08:00Z",
                           field) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=ZoneInfo(tz))


def create_ui(state: GatewayState) -> FastAPI:
    ui = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    ui.state.gateway = state
    ui.add_middleware(SecurityHeaders, frame_ancestors=state.settings.ui_frame_ancestors)
    ui.mount("/static", StaticFiles(directory=STATIC), name="static")

    @ui.exception_handler(StartSession)
    async def start_session(request: Request, exc: StartSession) -> Response:
        response = see_other(session.safe_next(exc.target))
        session.set_session(response, request, _state(request).settings, exc.token)
        return response

    @ui.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        if request.method != "GET" or request.url.path.endswith(("/log", "/state")):
            return JSONResponse({"error": {"message": exc.message or "log in first", "field": None}}, status_code=401)
        query = {"next": exc.target} | ({"why": "ended"} if exc.message else {})
        response = see_other("/ui/login?" + urlencode(query))
        if exc.message:
            session.end_session(response)
        return response

    @ui.exception_handler(KjobError)
    async def kjob_error(request: Request, exc: KjobError) -> Response:
        code = status_for(exc)
        if request.url.path.endswith(("/log", "/state")):
            return JSONResponse({"error": {"message": str(exc), "field": getattr(exc, "field", None)}}, status_code=code)
        return await _error_page(request, code, exc)

    @ui.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = "There is no such page." if exc.status_code == 404 else str(exc.detail)
        return await _error_page(request, exc.status_code, KjobError(message))

    @ui.exception_handler(DBAPIError)
    @ui.exception_handler(OSError)
    async def database_down(request: Request, exc: Exception) -> Response:
        log.warning("dashboard: database unavailable on %s: %s", request.url.path, exc)
        return await _error_page(request, 503, KjobError("the database is not answering; try again in a moment"),
                                 nav=False)

    @ui.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("dashboard: unhandled error on %s %s", request.method, request.url.path)
        return await _error_page(request, 500, KjobError("internal error; the server log has the details"), nav=False)

    async def _error_page(request: Request, code: int, exc: Exception, *, nav: bool = True) -> HTMLResponse:
        title = {401: "Log in", 403: "Not allowed", 404: "Not found", 405: "Not allowed", 409: "Conflict",
                 422: "Refused", 429: "Too many requests", 500: "Internal error",
                 503: "Unavailable"}.get(code, "Refused")
        message = f"There is no {exc.kind} {exc.key!r} in this tenant." if isinstance(exc, NotFound) else str(exc)
        # A logged-in user keeps the menu (and the log-out button) on an error page.
        s = None
        token = request.cookies.get(session.COOKIE)
        if nav and token:
            try:
                s = Session(request, token, await principal_of_token(state, token))
            except KjobError:
                s = None
        return render(s, "error.html", status_code=code, request=request, title=title, message=message)

    # -- login ---------------------------------------------------------------------------

    @ui.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request) -> Response:
        nonce = session.new_login_nonce()
        why = "Your session ended; log in again." if request.query_params.get("why") == "ended" else None
        response = render(None, "login.html", request=request, nonce=nonce, error=why,
                          next=session.safe_next(request.query_params.get("next")),
                          oidc=state.oidc is not None)
        session.set_login_nonce(response, request, state.settings, nonce)
        return response

    @ui.post("/login")
    async def login(request: Request) -> Response:
        fields = await form_of(request)
        nonce = request.cookies.get(session.LOGIN_COOKIE, "")
        target = session.safe_next(fields.get("next"))
        if not nonce or fields.get("nonce") != nonce:
            raise Forbidden("the login form expired or came from another site; reload the login page")
        token = fields.get("token", "").strip()
        try:
            await principal_of_token(state, token)
        except (Unauthorized, Forbidden) as err:
            fresh = session.new_login_nonce()
            response = render(None, "login.html", status_code=401, request=request, nonce=fresh, next=target,
                              error=str(err) if token else "paste a token first", oidc=state.oidc is not None)
            session.set_login_nonce(response, request, state.settings, fresh)
            return response
        response = see_other(target)
        session.set_session(response, request, state.settings, token)
        return response

    @ui.post("/logout")
    async def logout(request: Request) -> Response:
        await acting(request)
        response = see_other("/ui/login?" + urlencode({"next": "/ui/"}))
        session.end_session(response)
        return response

    # -- jobs ------------------------------------------------------------------------------

    @ui.get("/", response_class=HTMLResponse)
    async def jobs_page(request: Request) -> Response:
        s = await current(request)
        views = [_dump(j) for j in await s.call(jobs.list_jobs)]
        gate = asyncio.Semaphore(LIST_CONCURRENCY)

        async def summary(job: dict[str, Any]) -> present.Outcomes:
            async with gate:
                history = await s.call(runs.list_runs, slug=job["slug"], limit=present.STRIP)
            return present.outcomes([_dump(r) for r in history])

        rows = list(zip(views, await asyncio.gather(*(summary(j) for j in views))))
        q = request.query_params
        status_filter = q.get("status", "all") if q.get("status") in ("all", "enabled", "paused", "failing") else "all"
        sort = q.get("sort", "slug") if q.get("sort") in ("slug", "next", "last") else "slug"
        shown = present.filter_jobs(rows, text=q.get("q", ""), status=status_filter, label=q.get("label", ""),
                                    sort=sort)
        return render(s, "jobs.html", rows=shown, total=len(rows), q=q.get("q", ""), status=status_filter,
                      label=q.get("label", ""), sort=sort, parse=present.parse_instant)

    @ui.get("/jobs/{slug}", response_class=HTMLResponse)
    async def job_page(slug: str, request: Request) -> Response:
        s = await current(request)
        view = await s.call(jobs.get_job, slug=slug)
        job = _dump(view)
        history = [_dump(r) for r in await s.call(runs.list_runs, slug=slug, limit=200)]
        nexts: list[str] = []
        if job["enabled"]:
            after = job["enabled_at"] if job["enabled_at"] and job["enabled_at"] > utcnow() else None
            nexts = await s.call(schedules.preview_schedule, schedule=job["schedule"], tz=job["timezone"],
                                 after=after.isoformat() if after else None, n=10)
        trail = [_dump(a) for a in await s.call(audit.audit, slug=slug, limit=50)]
        return render(
            s, "job.html", job=job, spec_toml=dump_job(view.spec()), runs=history[:50],
            summary=present.outcomes(history), nexts=[present.parse_instant(n) for n in nexts],
            not_run=[r for r in history if r["status"] in present.NOT_RUN][:20], trail=trail,
            can_run=s.can(runs.run_now), can_pause=s.can(jobs.disable_job), can_edit=s.can(jobs.put_job),
            can_backfill=s.can(backfill.backfill), can_delete=s.can(jobs.delete_job),
        )

    @ui.post("/jobs/{slug}/run")
    async def run_now(slug: str, request: Request) -> Response:
        s, _ = await acting(request)
        run = await s.call(runs.run_now, slug=slug)
        return see_other(f"/ui/runs/{quote(run.id, safe='')}")

    @ui.post("/jobs/{slug}/pause")
    async def pause(slug: str, request: Request) -> Response:
        s, fields = await acting(request)
        note = fields.get("note", "").strip()
        if not note:
            raise InvalidInput("say why the job is paused; the note is shown on its page and in the list", "note")
        await s.call(jobs.disable_job, slug=slug, body=jobs.DisableRequest(note=note))
        return see_other(_job_url(slug, "paused"))

    @ui.post("/jobs/{slug}/resume")
    async def resume(slug: str, request: Request) -> Response:
        s, _ = await acting(request)
        await s.call(jobs.enable_job, slug=slug)
        return see_other(_job_url(slug, "resumed"))

    @ui.post("/jobs/{slug}/delete")
    async def delete(slug: str, request: Request) -> Response:
        s, fields = await acting(request)
        if fields.get("confirm", "").strip() != slug:
            raise InvalidInput(f"type the job's slug ({slug}) to confirm the delete", "confirm")
        await s.call(jobs.delete_job, slug=slug)
        return see_other("/ui/?done=deleted")

    # -- edit as TOML ------------------------------------------------------------------------

    @ui.get("/jobs/{slug}/edit", response_class=HTMLResponse)
    async def edit_page(slug: str, request: Request) -> Response:
        s = await current(request)
        job = await s.call(jobs.get_job, slug=slug)
        if not s.can(jobs.put_job):
            raise Forbidden(f"the token's role {s.principal.role!r} cannot change jobs; it needs 'editor' or higher")
        return render(s, "edit.html", slug=slug, text=dump_job(job.spec()), error=None)

    @ui.post("/jobs/{slug}/edit", response_class=HTMLResponse)
    async def edit(slug: str, request: Request) -> Response:
        s, fields = await acting(request)
        text = fields.get("toml", "")
        try:
            specs = load_jobs(text)
            if len(specs) != 1:
                raise InvalidInput("the file must hold this one job, as a single [job] table", "job")
            if specs[0].slug != slug:
                raise InvalidInput(f"the slug is {specs[0].slug!r}; it cannot change here (it stays {slug!r})",
                                   "job.slug")
            result = await s.call(jobs.put_job, slug=slug, spec=specs[0], response=Response())
        except InvalidInput as err:
            return render(s, "edit.html", status_code=422, slug=slug, text=text, error=err)
        return see_other(_job_url(slug, "unchanged" if result.action == "unchanged" else "saved"))

    # -- backfill ------------------------------------------------------------------------------

    @ui.get("/jobs/{slug}/backfill", response_class=HTMLResponse)
    async def backfill_page(slug: str, request: Request) -> Response:
        s = await current(request)
        job = _dump(await s.call(jobs.get_job, slug=slug))
        q = request.query_params
        preview = None
        error = None
        if q.get("from") or q.get("to"):
            try:
                start = _instant(q.get("from", ""), job["timezone"], "from")
                end = _instant(q.get("to", ""), job["timezone"], "to")
                slots = backfill_slots(Schedule.parse(job["schedule"]), job["timezone"], start, end, utcnow())
                # a slot recorded skipped or missed never ran: the backfill runs it (kjob.store.overlap)
                held = {r["slot"]: r for r in map(_dump, await s.call(runs.list_runs, slug=slug, limit=1000))
                        if RunStatus(r["status"]).value not in RERUNNABLE}
                preview = [(slot, held.get(slot)) for slot in slots]
            except InvalidInput as err:
                error = err
        return render(s, "backfill.html", status_code=422 if error else 200, job=job, preview=preview, error=error,
                      start=q.get("from", ""), end=q.get("to", ""), overlap=q.get("overlap", ""),
                      policies=OVERLAP_POLICIES, can_backfill=s.can(backfill.backfill))

    @ui.post("/jobs/{slug}/backfill", response_class=HTMLResponse)
    async def backfill_run(slug: str, request: Request) -> Response:
        s, fields = await acting(request)
        job = _dump(await s.call(jobs.get_job, slug=slug))
        try:
            body = backfill.BackfillRequest.model_validate({
                "from": _instant(fields.get("from", ""), job["timezone"], "from"),
                "to": _instant(fields.get("to", ""), job["timezone"], "to"),
                "overlap": fields.get("overlap") or None,
            })
        except ValidationError as err:
            raise validation_error(err) from None
        result = await s.call(backfill.backfill, slug=slug, body=body)
        return render(s, "backfilled.html", job=job, result=result)

    # -- runs ----------------------------------------------------------------------------------

    @ui.get("/runs/{run_id}", response_class=HTMLResponse)
    async def run_page(run_id: str, request: Request) -> Response:
        s = await current(request)
        run = _dump(await s.call(runs.get_run, run_id=run_id))
        output = ""
        if run["status"].final:
            output = (await s.call(runs.run_logs, run_id=run_id)).body.decode("utf-8", errors="replace")
        job = None
        try:
            job = _dump(await s.call(jobs.get_job, slug=run["slug"]))
        except NotFound:  # the job was deleted; its runs go with it, but a page may be open
            pass
        payload = None
        if job and run["status"].final:
            base = state.settings.public_url or str(request.base_url).rstrip("/").removesuffix("/ui")
            # what Relay got: the agent's answer when one was recorded (docs/agents.md)
            answer = (await UsageStore(state.runs.engine).for_delivery(run_id, run["attempt"], run["job_id"])
                      if state.runs is not None else None)
            body = answer.answer if answer and answer.answer is not None else run["output_excerpt"] or ""
            payload = dispatch_payload(run["slug"], job["output"]["channel"], run["status"],
                                       body, run_page_url(base, run_id))
        return render(s, "run.html", run=run, job=job, output=output, payload=payload,
                      can_run=s.can(runs.run_now))

    @ui.get("/runs/{run_id}/state")
    async def run_state(run_id: str, request: Request) -> Response:
        s = await current(request)
        run = await s.call(runs.get_run, run_id=run_id)
        return JSONResponse({"status": run.status.value, "final": run.status.final, "attempt": run.attempt},
                            headers={"Cache-Control": "no-store"})

    @ui.get("/runs/{run_id}/log")
    async def run_log(run_id: str, request: Request) -> Response:
        s = await current(request)
        return await s.call(runs.run_logs, run_id=run_id, follow=request.query_params.get("follow") == "true")

    # -- cluster ---------------------------------------------------------------------------------

    @ui.get("/cluster", response_class=HTMLResponse)
    async def cluster_page(request: Request) -> Response:
        s = await current(request)
        data = await s.call(status.status)
        return render(s, "cluster.html", data=data, now=utcnow())

    return ui
