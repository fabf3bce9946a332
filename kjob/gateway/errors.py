"""The one place where errors become HTTP answers.

Every error answer has the same JSON shape, whatever raised it:

    {"error": {"message": "<what is wrong and what to do>", "field": "<dotted field or null>",
               "kind": "<what went wrong, for programs>"}}

`kind` tells apart what one status covers (409: `conflict` or `quota_exceeded`), so a client
(kjob.client) raises the exception a caller catches by kind without reading the message.

    kjob.errors.InvalidInput (incl. ScheduleError, JobFileError)   422
    malformed JSON body                                            400 (field "body")
    FastAPI request validation (body, query, path)                 422 (field named)
    kjob.errors.Unauthorized                                       401 (+ WWW-Authenticate)
    kjob.errors.Forbidden                                          403
    kjob.errors.NotFound                                           404
    kjob.errors.Conflict (incl. QuotaExceeded)                     409
    kjob.errors.RateLimited                                        429 (+ Retry-After)
    body over the size limit                                       413
    kjob.errors.ServerError, database unreachable or dropped       503 (retry later)
    anything else                                                  500, logged, no traceback sent
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from nats.errors import Error as NatsError
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kjob.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    KjobError,
    NotFound,
    QuotaExceeded,
    RateLimited,
    ServerError,
    Unauthorized,
)
from kjob.model.job import error_from_detail

log = logging.getLogger(__name__)

#: Most specific first: the first matching class decides the status.
_STATUS: tuple[tuple[type[KjobError], int], ...] = (
    (InvalidInput, 422),
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (RateLimited, 429),
    (ServerError, 503),
)

#: The `kind` of each status, and of the exceptions more specific than their status says.
_KINDS: dict[int, str] = {
    400: "invalid_input", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "not_found",
    409: "conflict", 413: "invalid_input", 422: "invalid_input", 429: "rate_limited", 503: "unavailable",
    500: "internal",
}

#: Where FastAPI says a request value came from; the field name is what follows.
_SOURCES = frozenset({"body", "query", "path", "header", "cookie"})


class ErrorDetail(BaseModel):
    message: str
    field: str | None = None
    #: invalid_input, unauthorized, forbidden, not_found, conflict, quota_exceeded,
    #: rate_limited, unavailable or internal.
    kind: str | None = None


class ErrorBody(BaseModel):
    """Every error answer: what is wrong, what to do, and the field at fault (if one is)."""

    error: ErrorDetail


#: The error answers any `/v1` route may give, for the OpenAPI document (and so for clients
#: and the schema fuzzing test, which checks every answer against it).
V1_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "the body is not valid JSON"),
        (401, "no valid bearer token"),
        (403, "the token's role is too low"),
        (404, "no such object in your tenant"),
        (409, "conflicts with what is stored, or a quota is reached"),
        (413, "the body is too large"),
        (422, "invalid input; `field` names it"),
        (429, "rate limited; see Retry-After"),
        (503, "a server kjob depends on does not answer"),
    )
}


def error_body(message: str, field: str | None = None, kind: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "field": field, "kind": kind}}


def error_response(status: int, message: str, field: str | None = None, kind: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = error_body(message, field, kind or _KINDS.get(status, "internal" if status >= 500 else "invalid_input"))
    return JSONResponse(body, status_code=status, headers=headers)


def status_for(exc: KjobError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


async def _kjob_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, KjobError)
    status = status_for(exc)
    if status == 500:
        log.error("unmapped kjob error on %s %s: %r", request.method, request.url.path, exc)
        return error_response(500, "internal error; the server log has the details")
    if isinstance(exc, InvalidInput):
        return error_response(status, exc.message, exc.field)
    if isinstance(exc, RateLimited):
        response = error_response(status, str(exc))
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        return response
    return error_response(status, str(exc), kind="quota_exceeded" if isinstance(exc, QuotaExceeded) else None)


async def _request_invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = dict(exc.errors()[0])
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        detail = f": {reason}" if reason else ""
        return error_response(400, f"the request body is not valid JSON{detail}", "body")
    loc = tuple(first.get("loc", ()))
    source = loc[0] if loc and loc[0] in _SOURCES else None
    first["loc"] = loc[1:] if source else loc
    err = error_from_detail(first)
    if first.get("type") == "extra_forbidden" and source != "body":
        err = InvalidInput("is not a known parameter", err.field)
    return error_response(422, err.message, err.field or source)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    messages = {
        404: f"no such endpoint: {request.url.path} (the API lives under /v1; see /openapi.json)",
        405: f"{request.method} is not allowed on {request.url.path}",
    }
    return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)))


def _database_down(exc: Exception) -> bool:
    """A failure to reach or keep a database connection (as opposed to a bug in a query)."""
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc, (OperationalError, InterfaceError))
    return isinstance(exc, OSError)  # asyncpg's connect: refused, unreachable, timed out


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if _database_down(exc):
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return error_response(503, "the database is not answering; try again shortly")
    return await _unexpected(request, exc)


async def _bus_error(request: Request, exc: Exception) -> JSONResponse:
    # Not the database: say which server is at fault, so an operator looks in the right place.
    log.warning("NATS error on %s %s: %r", request.method, request.url.path, exc)
    return error_response(503, f"the message bus (NATS) did not answer or refused the request ({type(exc).__name__}); "
                               "try again shortly, and check `kjob status` and the NATS permissions of the api role")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal error; the server log has the details")


def install(app: FastAPI) -> None:
    """Route every error an endpoint can raise through the table above."""
    app.add_exception_handler(KjobError, _kjob_error)
    app.add_exception_handler(RequestValidationError, _request_invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # Registered by class (not only under Exception) so they are answered without Starlette
    # re-raising them into the server log as crashes.
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(OSError, _database_error)
    app.add_exception_handler(NatsError, _bus_error)
    app.add_exception_handler(Exception, _unexpected)
