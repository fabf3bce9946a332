"""The two drivers: each sends the core's `Request`s over httpx, one blocking, one with
asyncio. This is the only code that exists twice, once per kind of I/O; every operation is
written once in `kjob.client._ops`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
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
        try:
            for attempt in Retrying(**retry_policy(request, self.attempts)):
                with attempt:
                    response = self._http.request(request.method, request.path, params=request.params,
                                                  json=request.json)
        except httpx.TransportError as err:
            raise unreachable(self.target.url, err) from None
        if response.status_code >= 400:
            raise error_for(response, self.target)
        return response

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
        try:
            with self._http.stream(r.method, r.path, params=r.params,
                                   timeout=_stream_timeout(lines, self.timeout_s)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_for(response, self.target)
                yield from response.iter_lines()
        except httpx.TransportError as err:
            raise unreachable(self.target.url, err) from None


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
        try:
            async for attempt in AsyncRetrying(**retry_policy(request, self.attempts)):
                with attempt:
                    response = await self._http.request(request.method, request.path, params=request.params,
                                                        json=request.json)
        except httpx.TransportError as err:
            raise unreachable(self.target.url, err) from None
        if response.status_code >= 400:
            raise error_for(response, self.target)
        return response

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
        try:
            async with self._http.stream(r.method, r.path, params=r.params,
                                         timeout=_stream_timeout(lines, self.timeout_s)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_for(response, self.target)
                async for line in response.aiter_lines():
                    yield line
        except httpx.TransportError as err:
            raise unreachable(self.target.url, err) from None
