"""Which addresses a job's webhook may reach: not the node's own, nor its private networks.

A webhook URL is job input: without this check a job could make the dispatcher POST into
the node's own services (the API, NATS, PostgreSQL, a cloud metadata endpoint) or anything on
the private network around it. Refused, unless the operator allow-lists them
(`dispatcher.allow_private_targets`):

    loopback        127.0.0.0/8, ::1
    link-local      169.254.0.0/16 (cloud metadata), fe80::/10
    private         10/8, 172.16/12, 192.168/16, fc00::/7 (ULA)
    shared          100.64.0.0/10 (carrier-grade NAT)
    this network    0.0.0.0/8, ::
    multicast       224.0.0.0/4, ff00::/8
    reserved        everything else that is not globally routable (240/4, documentation ranges, ...)

IPv6 forms that carry an IPv4 address (`::ffff:127.0.0.1`, `::127.0.0.1`, 6to4, NAT64) are
judged by that address, and a host written as a number in any spelling the C resolver accepts
(`2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`) is judged as the address it means. Names are
judged by what they resolve to, by the caller (kjob.dispatcher.targets): this module has no I/O;
`localhost` names are loopback whatever the resolver says.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from kjob.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_SHARED = ipaddress.ip_network("100.64.0.0/10")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: One part of a numeric IPv4 host as inet_aton reads it: decimal, octal (0...) or hex (0x...).
_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*)$")


def parse_ip(host: str) -> IPAddress | None:
    """The address `host` spells, or None when it is a name.

    Accepts `[v6]` and every IPv4 spelling of inet_aton (1 to 4 dot-separated numbers, each
    decimal, octal or hex), because that is what the resolver would connect to.
    """
    text = host.strip().rstrip(".") if host else ""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        pass
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_NUMBER.match(p) for p in parts):
        return None
    numbers = [int(p[2:] or "0", 16) if p[:2].lower() == "0x" else int(p, 8) if len(p) > 1 and p[0] == "0" else int(p or "0")
               for p in parts]
    # a.b.c.d; a.b.c (c: 16 bits); a.b (b: 24 bits); a (32 bits)
    last_bits = 8 * (5 - len(numbers))
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 1 << last_bits:
        return None
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value |= n << (24 - 8 * i)
    return ipaddress.IPv4Address(value)


def named_address(host: str) -> IPAddress | None:
    """The address a name stands for whatever DNS says: `localhost` and `*.localhost` are
    loopback (RFC 6761), with or without the final dot, in any case."""
    name = host.strip().rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return ipaddress.IPv4Address("127.0.0.1")
    return None


def embedded_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, NAT64), else `ip`."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    # ::a.b.c.d (deprecated "compatible"), but not :: and ::1 themselves
    if int(ip) >> 32 == 0 and int(ip) > 1:
        return ipaddress.IPv4Address(int(ip))
    return ip


def blocked_reason(ip: IPAddress) -> str | None:
    """Why a webhook may not reach `ip` ("loopback", "private", ...), or None: a public address."""
    ip = embedded_ipv4(ip)
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified or ip in _THIS_NETWORK:
        return "this-network"
    if ip in _SHARED:
        return "shared (carrier-grade NAT)"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "reserved"
    return None


@dataclass(frozen=True)
class AllowList:
    """What the operator lets webhooks reach despite `blocked_reason`: networks and host names.

    A name entry (`hooks.internal`, `localhost`) lets a URL naming exactly that host reach
    whatever it resolves to; a network entry (`10.1.0.0/16`, `127.0.0.1`) lets any URL reach
    addresses inside it.
    """

    networks: tuple[Network, ...] = ()
    names: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, entries: Iterable[str], field: str = "dispatcher.allow_private_targets") -> AllowList:
        networks: list[Network] = []
        names: set[str] = set()
        for entry in entries:
            text = entry.strip().lower()
            try:
                networks.append(ipaddress.ip_network(text.replace("[", "").replace("]", ""), strict=False))
            except ValueError:
                if not re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", text.rstrip(".")):
                    raise InvalidInput(f"{entry!r} is neither a network (CIDR), an address nor a host name",
                                       field) from None
                names.add(text.rstrip("."))
        return cls(tuple(networks), frozenset(names))

    def allows(self, host: str, ip: IPAddress) -> bool:
        if host.strip("[]").lower().rstrip(".") in self.names:
            return True
        return any(candidate in net for net in self.networks for candidate in {ip, embedded_ipv4(ip)}
                   if candidate.version == net.version)


def check_address(host: str, ip: IPAddress, allow: AllowList, field: str = "output.channel") -> None:
    """Raise InvalidInput (naming `field`) if a webhook to `host` may not connect to `ip`."""
    reason = blocked_reason(ip)
    if reason is not None and not allow.allows(host, ip):
        where = f"{host} ({ip})" if parse_ip(host) != ip else str(ip)
        raise InvalidInput(
            f"webhook target {where} is a {reason} address: webhooks may not reach the node's own or private "
            "networks unless the operator allow-lists them (dispatcher.allow_private_targets)",
            field,
        )
