"""kjob.model.targets without servers: every spelling of a blocked address is recognised."""

from __future__ import annotations

import pytest

from kjob.errors import InvalidInput
from kjob.model.targets import AllowList, blocked_reason, check_address, named_address, parse_ip


@pytest.mark.parametrize(("host", "reason"), [
    ("127.0.0.1", "loopback"), ("127.1", "loopback"), ("2130706433", "loopback"), ("0x7f000001", "loopback"),
    ("0177.0.0.1", "loopback"), ("0x7f.0.0.1", "loopback"), ("[::1]", "loopback"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:7f00:1", "loopback"), ("::127.0.0.1", "loopback"),
    ("64:ff9b::7f00:1", "loopback"), ("2002:7f00:1::", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("::ffff:169.254.169.254", "link-local"),
    ("10.0.0.1", "private"), ("172.31.255.255", "private"), ("192.168.0.1", "private"), ("fd12::1", "private"),
    ("100.64.0.1", "shared (carrier-grade NAT)"), ("100.127.255.255", "shared (carrier-grade NAT)"),
    ("0.0.0.0", "this-network"), ("0", "this-network"), ("0.1.2.3", "this-network"), ("::", "this-network"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("255.255.255.255", "private"),
    ("240.0.0.1", "private"),
])
def test_blocked_spellings(host: str, reason: str) -> None:
    ip = parse_ip(host)
    assert ip is not None, host
    assert blocked_reason(ip) == reason


@pytest.mark.parametrize("host", ["8.8.8.8", "93.184.215.14", "2606:4700::1111", "100.128.0.1"])
def test_public_addresses_pass(host: str) -> None:
    ip = parse_ip(host)
    assert ip is not None and blocked_reason(ip) is None


@pytest.mark.parametrize("host", ["example.com", "256.1.1.1", "1.2.3.4.5", "127.0.0.1.nip.io", "0x1g"])
def test_names_are_not_addresses(host: str) -> None:
    assert parse_ip(host) is None


def test_localhost_names_are_loopback_whatever_dns_says() -> None:
    for name in ("localhost", "LOCALHOST.", "api.localhost", "x.y.localhost."):
        assert named_address(name) is not None
    assert named_address("localhost.example") is None


def test_allow_list_entries() -> None:
    allow = AllowList.parse(["10.0.0.0/8", "hooks.internal", "::1", "[fd00::]/8"])
    assert allow.allows("10.2.3.4", parse_ip("10.2.3.4"))  # type: ignore[arg-type]
    assert allow.allows("x", parse_ip("::ffff:10.0.0.1"))  # type: ignore[arg-type]
    assert allow.allows("HOOKS.internal.", parse_ip("192.168.1.1"))  # type: ignore[arg-type]
    assert not allow.allows("other.internal", parse_ip("192.168.1.1"))  # type: ignore[arg-type]
    with pytest.raises(InvalidInput) as err:
        check_address("127.0.0.1", parse_ip("127.0.0.1"), allow)  # type: ignore[arg-type]
    assert err.value.field == "output.channel" and "loopback" in err.value.message
    for bad in ("10.0.0.0/33", "not a host!", ""):
        with pytest.raises(InvalidInput) as err:
            AllowList.parse([bad])
        assert err.value.field == "dispatcher.allow_private_targets"
