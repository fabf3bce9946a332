"""`Client` and `AsyncClient`: the same API (kjob.client._resources) over a blocking or an
asyncio driver."""

from __future__ import annotations

from types import TracebackType

from kjob.client._config import DEFAULT_ATTEMPTS, DEFAULT_TIMEOUT_S, resolve
from kjob.client._drivers import AsyncDriver, SyncDriver
from kjob.client._ops import D
from kjob.client._resources import Api
from kjob.config import Settings


class _Connected(Api[D]):
    """{kind} client of the kjob API.

    `url` and `token` default as the CLI's (`KJOB_API_URL`, `KJOB_TOKEN`, config.toml, else the
    files `kjob up` writes under `KJOB_HOME`). `timeout_s` bounds each request; an idempotent
    request that meets a connection error is tried up to `attempts` times, with backoff.

    Resources: `jobs`, `runs`, `tokens`, `secrets`, `audit`, `quotas`; and `status()`.
    """

    _driver_type: type[D]

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 attempts: int = DEFAULT_ATTEMPTS, settings: Settings | None = None) -> None:
        super().__init__(self._driver_type(resolve(url, token, settings), timeout_s, attempts))

    @property
    def url(self) -> str:
        """The API's base URL this client talks to."""
        return self._driver.target.url


class Client(_Connected[SyncDriver]):
    __doc__ = (_Connected.__doc__ or "").format(kind="A blocking")
    _driver_type = SyncDriver

    def close(self) -> None:
        self._driver.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncClient(_Connected[AsyncDriver]):
    __doc__ = (_Connected.__doc__ or "").format(kind="An asyncio")
    _driver_type = AsyncDriver

    async def aclose(self) -> None:
        await self._driver.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, err: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
