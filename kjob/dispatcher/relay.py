"""Delivery of run results over HTTP: to Kode Relay, or straight to a webhook.

One poster serves both routes. Which one a channel takes is `channel_kind`:

    none                   stored only; nothing is posted
    webhook:<url>          no Relay configured: POST the payload to <url>
    anything else          POST {relay_url}/v1/dispatch (webhooks too, when a Relay is configured:
                           Relay formats and delivers them)

A webhook URL is job input, so kjob connects only to an address it checked just before
(kjob.dispatcher.targets): not loopback, link-local or private unless the operator allow-lists
it; a refused address is a rejection. Relay's URL is the operator's configuration: trusted.

Every POST carries `Idempotency-Key: <run id>`, so a receiver can drop the duplicates that
at-least-once delivery produces (invariant 2). The Relay token goes to Relay only, never to a
webhook. HTTP outcomes become kjob errors in exactly one place, `RelayClient._post`:

    2xx                                   delivered: the status is returned
    connection error, timeout, 5xx,       RelayUnavailable: worth retrying later
    408 Request Timeout, 429 Too Many
    other 4xx, 3xx, unusable URL          RelayRejected: the request itself is wrong; retrying
                                          cannot help
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from kjob.dispatcher.targets import Unresolvable, pinned_request
from kjob.errors import InvalidInput, RelayRejected, RelayUnavailable
from kjob.model.targets import AllowList

ChannelKind = Literal["none", "webhook", "relay"]

WEBHOOK_PREFIX = "webhook:"
DISPATCH_PATH = "/v1/dispatch"

#: 4xx answers that mean "not now" rather than "never": a rate limit or a server that gave up
#: waiting for the request. Treating them as rejections would drop results on a busy day.
RETRYABLE_4XX = frozenset({408, 429})

#: How much of a refusing answer's body goes into the error (and so into the run's record).
EXCERPT_CHARS = 200


def channel_kind(channel: str, relay_configured: bool) -> ChannelKind:
    """How `channel` is delivered: "none" (stored only), "webhook" (posted to its URL by kjob)
    or "relay" (posted to Relay).

    :raises InvalidInput: (field `output.channel`) a Relay channel while no Relay is configured.
    """
    if channel == "none":
        return "none"
    if relay_configured:
        return "relay"
    if channel.startswith(WEBHOOK_PREFIX):
        return "webhook"
    raise InvalidInput(
        f"channel {channel!r} needs a Relay: set KJOB_RELAY_URL, or use 'webhook:https://...' or 'none'",
        "output.channel",
    )


class RelayClient:
    """Posts run results to Relay or a webhook. One instance per dispatcher; close it after use
    (`aclose()` or `async with`)."""

    def __init__(self, base_url: str | None, token: str | None, timeout_s: float,
                 allow_private: AllowList | None = None) -> None:
        """`base_url`: Relay's base URL (e.g. `https://relay.example`), or None for no Relay.
        `timeout_s` bounds each POST as a whole: connecting, sending and reading the answer.
        `allow_private`: the blocked webhook addresses the operator allows (none by default).

        :raises InvalidInput: (field `relay_url`) `base_url` is not an http(s) URL.
        """
        self._base_url = base_url.rstrip("/") if base_url else None
        if self._base_url is not None and urlsplit(self._base_url).scheme not in ("http", "https"):
            raise InvalidInput(f"{base_url!r} is not an http(s) URL, e.g. 'https://relay.example'", "relay_url")
        self._token = token or None
        self._timeout_s = timeout_s
        self._allow = allow_private or AllowList()
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), headers={"User-Agent": "kjob"})

    @property
    def relay_configured(self) -> bool:
        return self._base_url is not None

    async def dispatch(self, channel: str, payload: dict[str, Any], idempotency_key: str) -> int:
        """POST `payload` (sent as is: the RFC section 7 body) on the route `channel` takes,
        with `Idempotency-Key: idempotency_key` (the run id). Returns the 2xx status.

        :raises RelayUnavailable: connection error, timeout, 5xx, 408 or 429; retry later.
        :raises RelayRejected: any other answer, or a channel that cannot be delivered here
            (`none`, or a Relay channel with no Relay configured); retrying cannot help.
        """
        try:
            kind = channel_kind(channel, self.relay_configured)
        except InvalidInput as e:
            raise RelayRejected(e.message) from None
        headers = {"Idempotency-Key": idempotency_key}
        if kind == "relay":
            assert self._base_url is not None
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            return await self._post(self._base_url + DISPATCH_PATH, payload, headers, "Relay")
        if kind == "webhook":
            url = channel[len(WEBHOOK_PREFIX):]
            try:
                pinned, host, extensions = await pinned_request(url, self._allow)
            except InvalidInput as e:
                raise RelayRejected(e.message) from None
            except Unresolvable as e:
                raise RelayUnavailable(f"cannot reach webhook at {_origin(url)}: {e}") from None
            return await self._post(pinned, payload, {**headers, **host}, "webhook", extensions, shown=url)
        raise RelayRejected("channel 'none' stores results only; there is nothing to deliver")

    async def _post(self, url: str, payload: dict[str, Any], headers: dict[str, str], what: str,
                    extensions: dict[str, Any] | None = None, shown: str | None = None) -> int:
        """The one place where HTTP outcomes become kjob errors (see the module docstring).
        `shown`: the URL to name in messages, when `url` is its pinned address."""
        # Only scheme and host in messages: webhook paths and queries often embed secrets.
        target = f"{what} at {_origin(shown or url)}"
        try:
            # httpx's timeout is per phase; this bounds the whole exchange, slow drips included.
            async with asyncio.timeout(self._timeout_s):
                response = await self._http.post(url, json=payload, headers=headers, extensions=extensions)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
            raise RelayRejected(f"cannot post to {target}: {e}") from e
        except (TimeoutError, httpx.TimeoutException) as e:
            raise RelayUnavailable(f"{target} did not answer within {self._timeout_s:g}s") from e
        except httpx.TransportError as e:
            raise RelayUnavailable(f"cannot reach {target}: {type(e).__name__}: {e}") from e
        status = response.status_code
        if 200 <= status < 300:
            return status
        message = f"{target} answered {status}: {_excerpt(response.text)}"
        if status >= 500 or status in RETRYABLE_4XX:
            raise RelayUnavailable(message, status)
        raise RelayRejected(message + _hint(status, what), status)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "RelayClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _origin(url: str) -> str:
    """`scheme://host[:port]` of `url`, without credentials, path or query."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "an unusable URL"
    return f"{parts.scheme}://{parts.hostname or ''}{port}"


def _excerpt(text: str) -> str:
    flat = re.sub(r"\s+", " ", text).strip()
    if not flat:
        return "(empty body)"
    return flat if len(flat) <= EXCERPT_CHARS else flat[: EXCERPT_CHARS - 1] + "…"


def _hint(status: int, what: str) -> str:
    """What to do about a rejection, when the status says."""
    if 300 <= status < 400:
        return "; redirects are not followed: use the final URL"
    if what == "Relay" and status in (401, 403):
        return "; check KJOB_RELAY_TOKEN"
    if what == "Relay" and status == 404:
        return f"; check KJOB_RELAY_URL: it is Relay's base URL, without {DISPATCH_PATH}"
    if what == "webhook" and status in (401, 403, 404, 410):
        return "; check the job's webhook URL"
    return ""
