"""The gateway as the D-Bus service calls it: one request with one caller's token.

It wraps the CLI's client (kjob.cli.client) in a thread, so the D-Bus service and the CLI
speak to `/v1` through the same code; when a shared client lands, only this module changes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kjob.cli.client import ApiClient, Target

#: Shown in 401 messages where the CLI names the token's file.
TOKEN_SOURCE = "the D-Bus call"


class Gateway:
    def __init__(self, url: str) -> None:
        self.url = url

    async def call(self, token: str, method: str, *args: Any) -> Any:
        """`ApiClient.<method>(*args)` as the holder of `token`.

        :raises ApiError: the gateway's refusal (status, message, field).
        :raises Unreachable: no gateway answers.
        :raises InvalidInput: an argument the client refuses before sending (a slug with '/').
        """

        def request() -> Any:
            with ApiClient(Target(self.url, token, TOKEN_SOURCE)) as client:
                return getattr(client, method)(*args)

        return await asyncio.to_thread(request)

    async def tenant_of(self, token: str) -> str:
        """The token's tenant; any valid token may read its own tenant's quotas."""
        return (await self.call(token, "request", "GET", "/v1/quotas"))["tenant"]
