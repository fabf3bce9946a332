"""The client's requests as data. An operation is written once, as a generator that yields
`Request`s and receives their answers (`kjob.client._ops`); a driver (`kjob.client._drivers`),
sync or async, sends them. Nothing here does I/O."""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import TypeAdapter
from tenacity import retry_if_exception_type, stop_after_attempt, wait_exponential

from kjob.client._errors import InvalidInput
from kjob.model.job import SLUG_PATTERN

T = TypeVar("T")

#: What an operation is: it yields requests, receives each answer (a 2xx; errors are raised
#: by the driver), and returns its result.
Flow = Generator["Request", httpx.Response, T]

#: Failures after which a request may not have been answered (never a read timeout: the
#: server may still be working on it, and the caller's timeout is the bound).
RETRIED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    #: A body already serialized as JSON, sent as it is (instead of `json`).
    content: bytes | None = None
    #: Sending it twice changes nothing more than once: retried after a connection error.
    idempotent: bool = False
    #: Seconds to wait before sending (polling).
    delay_s: float = 0.0

    def body(self) -> dict[str, Any]:
        """httpx's keyword arguments for the body."""
        if self.content is not None:
            return {"content": self.content, "headers": {"content-type": "application/json"}}
        return {"json": self.json}


@dataclass(frozen=True)
class Paged(Generic[T]):
    """A listing: the first request, and how to read a page into its items and the request
    for the next page (None after the last)."""

    first: Request
    read: Callable[[httpx.Response, Request], tuple[list[T], Request | None]]


@dataclass(frozen=True)
class Lines:
    """A text answer read line by line as it arrives (a run's log)."""

    request: Request
    #: No read timeout: a followed run may be silent for as long as it runs.
    endless: bool = False


def retry_policy(request: Request, attempts: int) -> dict[str, Any]:
    """tenacity's arguments for `request`: idempotent ones are tried `attempts` times."""
    return {
        "stop": stop_after_attempt(attempts if request.idempotent else 1),
        "wait": wait_exponential(multiplier=0.25, max=2.0),
        "retry": retry_if_exception_type(RETRIED),
        "reraise": True,
    }


def parse(model: type[T], response: httpx.Response) -> T:
    """The answer's JSON as `model` (a pydantic model or a type such as list[JobView])."""
    return TypeAdapter(model).validate_json(response.content)


def segment(slug: str) -> str:
    """`slug` as one URL path segment. A text that cannot be a slug is refused here: servers
    decode `%2F` before routing, so it would reach the wrong route, not a clear 404."""
    if not re.match(SLUG_PATTERN, slug):
        raise InvalidInput(f"{slug!r} cannot be a job's slug: slugs are lowercase letters, digits and '-'", "slug")
    return quote(slug, safe="")


def name_segment(text: str) -> str:
    """A token id, secret name or run id as one path segment."""
    return quote(text, safe="")

