"""The two drivers: each sends the core's `Request`s over httpx, one blocking, one with
asyncio. This is the only code that exists twice, once per kind of I/O; every operation is
written once in `kjob.client._ops`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import TypeVar

import httpx
from tenacity import AsyncRetrying, Retrying

from kjob.client._config import Target
from kjob.client._errors import error_for, unreachable
from kjob.client._wire import Flow, Lines, Paged, Request, retry_policy

T = TypeVar("T")


def _http_args(target: Target, timeout_s: float) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
    return {"base_url": target.url, "headers": headers, "timeout": httpx.Timeout(timeout_s)}


def _stream_timeout(lines: Lines, timeout_s: float) -> httpx.Timeout:
    return httpx.Timeout(timeout_s, read=None) if lines.endless else httpx.Timeout(timeout_s)


@contextmanager
def _reaching(target: Target) -> Iterator[None]:
    """httpx's connection errors inside, as the client's own (kjob.client._errors.unreachable)."""
    try:
        yield
    except httpx.TransportError as err:
        raise unreachable(target.url, err) from None


def _answered(response: httpx.Response, target: Target) -> httpx.Response:
    """`response` if it is 2xx or 3xx. :raises ApiError: by kind, for any other."""
    if response.status_code >= 400:
        raise error_for(response, target)
    return response


class SyncDriver:
    def __init__(self, target: Target, timeout_s: float, attempts: int) -> None:
        self.target, self.timeout_s, self.attempts = target, timeout_s, attempts
        self._http = httpx.Client(**_http_args(target, timeout_s))  # type: ignore[arg-type]

    def close(self) -> None:
        self._http.close()

    def send(self, request: Request) -> httpx.Response:
        """The 2xx answer to `request`. :raises ApiError: by kind (kjob.client._errors)."""
        if request.delay_s:
            time.sleep(request.delay_s)
        with _reaching(self.target):
            for attempt in Retrying(**retry_policy(request, self.attempts)):
                with attempt:
                    response = self._http.request(request.method, request.path, params=request.params,
                                                  **request.body())
        return _answered(response, self.target)

    def run(self, flow: Flow[T]) -> T:
        try:
            request = next(flow)
            while True:
                request = flow.send(self.send(request))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def iterate(self, paged: Paged[T]) -> Iterator[T]:
        request: Request | None = paged.first
        while request is not None:
            items, request = paged.read(self.send(request), request)
            yield from items

    def lines(self, lines: Lines) -> Iterator[str]:
        r = lines.request
        with _reaching(self.target), self._http.stream(r.method, r.path, params=r.params,
                                                       timeout=_stream_timeout(lines, self.timeout_s)) as response:
            if response.status_code >= 400:
                response.read()
            yield from _answered(response, self.target).iter_lines()


class AsyncDriver:
    def __init__(self, target: Target, timeout_s: float, attempts: int) -> None:
        self.target, self.timeout_s, self.attempts = target, timeout_s, attempts
        self._http = httpx.AsyncClient(**_http_args(target, timeout_s))  # type: ignore[arg-type]

    async def close(self) -> None:
        await self._http.aclose()

    async def send(self, request: Request) -> httpx.Response:
        """The 2xx answer to `request`. :raises ApiError: by kind (kjob.client._errors)."""
        if request.delay_s:
            await asyncio.sleep(request.delay_s)
        with _reaching(self.target):
            async for attempt in AsyncRetrying(**retry_policy(request, self.attempts)):
                with attempt:
                    response = await self._http.request(request.method, request.path, params=request.params,
                                                        **request.body())
        return _answered(response, self.target)

    async def run(self, flow: Flow[T]) -> T:
        try:
            request = next(flow)
            while True:
                request = flow.send(await self.send(request))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def iterate(self, paged: Paged[T]) -> AsyncIterator[T]:
        request: Request | None = paged.first
        while request is not None:
            items, request = paged.read(await self.send(request), request)
            for item in items:
                yield item

    async def lines(self, lines: Lines) -> AsyncIterator[str]:
        r = lines.request
        with _reaching(self.target):
            async with self._http.stream(r.method, r.path, params=r.params,
                                         timeout=_stream_timeout(lines, self.timeout_s)) as response:
                if response.status_code >= 400:
                    await response.aread()
                async for line in _answered(response, self.target).aiter_lines():
                    yield line
