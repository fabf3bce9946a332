"""The gateway as the D-Bus service calls it: kjob's own client, with one caller's token.

The URL and the token are always both given, so the client never falls back to the node's
own `admin.token` (a caller with an empty token gets the API's 401, nothing more).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from kjob.client import AsyncClient


class Gateway:
    def __init__(self, url: str) -> None:
        self.url = url

    @contextlib.asynccontextmanager
    async def as_caller(self, token: str) -> AsyncIterator[AsyncClient]:
        async with AsyncClient(self.url, token) as client:
            yield client

    async def tenant_of(self, token: str) -> str:
        """The token's tenant; any valid token may read its own tenant's quotas.

        :raises kjob.client.ApiError: Unauthorized for a token that is not (or no longer) valid.
        """
        async with self.as_caller(token) as client:
            return (await client.quotas.get()).tenant
