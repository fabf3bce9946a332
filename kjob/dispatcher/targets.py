"""Webhook targets checked where they are resolved: at create time and at every connect.

`resolve_target` resolves a webhook URL's host and refuses it (InvalidInput, `output.channel`)
if any address it resolves to is blocked by kjob.model.targets. The dispatcher then connects to
the very address that was checked (`pinned_request`: the URL's host replaced by that address,
the `Host` header and TLS server name kept), so a name that resolves elsewhere a moment later
(DNS rebinding) cannot slip past the check.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx

from kjob.errors import InvalidInput
from kjob.model.targets import AllowList, IPAddress, check_address, named_address, parse_ip

FIELD = "output.channel"
#: A resolver that does not answer in this time counts as "does not resolve now".
RESOLVE_TIMEOUT_S = 5.0


class Unresolvable(Exception):
    """The host has no address right now (DNS down, or no such name)."""


def _url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as err:
        raise InvalidInput(f"the webhook URL cannot be used: {err}", FIELD) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidInput("a webhook channel is 'webhook:https://host/path'", FIELD)
    return parsed


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


async def resolve_target(url: str, allow: AllowList) -> list[IPAddress]:
    """The addresses the webhook `url` reaches, all of them allowed.

    :raises InvalidInput: (field `output.channel`) not an http(s) URL, or an address is blocked.
    :raises Unresolvable: the name resolves to nothing now.
    """
    parsed = _url(url)
    literal = parse_ip(parsed.host) or named_address(parsed.host)
    if literal is not None:
        check_address(parsed.host, literal, allow, FIELD)
        return [literal]
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await asyncio.get_running_loop().getaddrinfo(parsed.host, _port(parsed), type=socket.SOCK_STREAM)
    except TimeoutError:
        raise Unresolvable(f"{parsed.host} did not resolve within {RESOLVE_TIMEOUT_S:g}s") from None
    except (socket.gaierror, UnicodeError) as err:
        raise Unresolvable(f"{parsed.host} does not resolve: {err}") from None
    addresses = list(dict.fromkeys(parse_ip(str(info[4][0])) for info in infos))
    found = [ip for ip in addresses if ip is not None]
    if not found:
        raise Unresolvable(f"{parsed.host} resolves to no address")
    for ip in found:  # one blocked address refuses the name: which one a client picks is chance
        check_address(parsed.host, ip, allow, FIELD)
    return found


async def check_target_at_create(channel_url: str, allow: AllowList) -> None:
    """The create-time check: a name that does not resolve now is accepted (the dispatcher
    checks again when it connects), a blocked address is refused."""
    try:
        await resolve_target(channel_url, allow)
    except Unresolvable:
        pass


async def pinned_request(url: str, allow: AllowList) -> tuple[str, dict[str, str], dict[str, Any]]:
    """What to POST so that the connection goes to a checked address: the URL with that
    address as its host, the `Host` header, and httpx's `sni_hostname` extension for TLS."""
    parsed = _url(url)
    ip = (await resolve_target(url, allow))[0]
    if parse_ip(parsed.host) is not None and str(ip) == parsed.host:
        return url, {}, {}
    pinned = parsed.copy_with(host=str(ip))
    host_header = parsed.host if parsed.port is None else f"{parsed.host}:{parsed.port}"
    if ":" in parsed.host:
        host_header = f"[{parsed.host}]" + (f":{parsed.port}" if parsed.port is not None else "")
    extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
    return str(pinned), {"Host": host_header}, extensions
