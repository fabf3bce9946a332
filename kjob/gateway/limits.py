"""What a request may carry, enforced before any endpoint reads it: a cap on bodies, and no
text the store cannot hold (NUL, lone surrogates: kjob.model.text) in a JSON or form body, a path
parameter or a query parameter. Each is refused with kjob's JSON error naming the field, so
no input reaches PostgreSQL only to come back as a 500."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import parse_qsl

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kjob.errors import InvalidInput
from kjob.model.text import find_bad_text, text_problem

#: A job is at most a 64 KiB prompt plus small fields. A job file applied at once
#: (`/v1/jobs:apply`) has its own, larger limit: `api.apply_max_body_bytes`.
MAX_BODY_BYTES = 256 * 1024
#: Jobs in one apply; the body limit and the tenant's job quota usually bind first.
MAX_APPLY_JOBS = 100_000


class BodyLimit:
    """Answer 413 (kjob's JSON error shape) to a body over `max_bytes`, whether it announces
    its length or streams in chunks. The body is buffered (it is small by construction) and
    replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES, per_path: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        #: Paths allowed another limit (a job file of 10,000 jobs is some 8 MB of JSON).
        self.per_path = per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope.get("path", ""), self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # disconnect: let the app see it
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._refuse(send, limit)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if size > MAX_BODY_BYTES:  # seconds of CPU for a large job file: off the event loop
            bad = await asyncio.to_thread(_bad_json_text, scope, body)
        else:
            bad = _bad_json_text(scope, body)
        if bad is not None:
            field, problem = bad
            await _answer(send, 422, problem, field)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, limit: int) -> None:
        await _answer(send, 413, f"the request body is larger than {limit // 1024} KiB", "body")


def _bad_json_text(scope: Scope, body: bytes) -> tuple[str, str] | None:
    """(field, why) of the first unstorable string of a JSON or form body (the dashboard's);
    None also for a body that cannot be parsed (the endpoint answers that one, 400)."""
    content_type = dict(scope["headers"]).get(b"content-type", b"application/json")
    if not body:
        return None
    if content_type.startswith(b"application/x-www-form-urlencoded"):
        value: object = dict(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
    elif b"json" in content_type:
        try:
            value = json.loads(body)
        except ValueError:
            return None
    else:
        return None
    found = find_bad_text(value)
    if found is None:
        return None
    field, problem = found
    return field or "body", problem


async def _answer(send: Send, status: int, message: str, field: str | None) -> None:
    body = json.dumps({"error": {"message": message, "field": field}}, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def storable_parameters(request: Request) -> None:
    """A dependency of every /v1 route: refuse path and query parameters holding unstorable
    text, naming the parameter.

    :raises InvalidInput: field: the parameter's name.
    """
    for name, value in (*request.path_params.items(), *request.query_params.multi_items()):
        problem = text_problem(value) if isinstance(value, str) else None
        if problem:
            raise InvalidInput(problem, name)
