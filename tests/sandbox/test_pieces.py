"""The sandbox's pure pieces: user resolution, sizes, exit reasons, the output collector."""

from __future__ import annotations

from pathlib import Path

import pytest

from kjob.config import load_settings
from kjob.errors import InvalidInput
from kjob.executor.sandbox import DockerSandbox, ProcessSandbox, make_sandboxes
from kjob.executor.sandbox.docker import NOBODY, _StartError, resolve_user
from kjob.executor.sandbox.exits import exit_reason
from kjob.executor.sandbox.output import OutputCollector
from kjob.model.sizes import parse_size
from tests.sandbox.conftest import Sink

PASSWD = "root:x:0:0::/root:/bin/sh\ndaemon:x:1:1::/:/bin/false\nagent:x:1000:1000::/home/agent:/bin/sh\n"
GROUP = "root:x:0:\nagent:x:1000:\nstaff:x:50:\n"


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        ("", (1000, 1000)),  # no USER: the first regular user
        ("agent", (1000, 1000)),
        ("root", (0, 0)),  # an image that asks for root gets root (with no capabilities)
        ("1000:50", (1000, 50)),
        ("agent:staff", (1000, 50)),
        ("4242", (4242, 4242)),  # a uid the image does not list is still a uid
    ],
)
def test_user_resolution(declared: str, expected: tuple[int, int]) -> None:
    assert resolve_user(declared, PASSWD, GROUP) == expected


def test_user_resolution_without_regular_users_is_nobody() -> None:
    assert resolve_user("", "root:x:0:0::/root:/bin/sh\n", "") == NOBODY


@pytest.mark.parametrize("declared", ["ghost", "agent:ghosts"])
def test_unknown_user_or_group_is_a_start_error(declared: str) -> None:
    with pytest.raises(_StartError, match="ghost"):
        resolve_user(declared, PASSWD, GROUP)


@pytest.mark.parametrize(("text", "size"), [("64m", 64 << 20), ("1.5g", 3 << 29), ("512MiB", 512 << 20), ("100", 100)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "0m", "-1g", "12 parsecs", ""])
def test_bad_sizes_name_the_field(text: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_size(text, "sandbox.memory")
    assert err.value.field == "sandbox.memory"


def test_exit_reasons() -> None:
    assert exit_reason(1) is None
    assert "SIGKILL" in (exit_reason(-9) or "")
    assert "128+15" in (exit_reason(143) or "") and "SIGTERM" in (exit_reason(143) or "")


async def test_a_character_split_across_chunks_and_the_cap_is_counted() -> None:
    sink = Sink()
    collector = OutputCollector(cap_bytes=5, sink=sink, run_id="r")
    euro = "€".encode()  # 3 bytes

    await collector.feed("stdout", b"ab" + euro[:1])
    await collector.feed("stdout", euro[1:] + b"cd")
    fields = await collector.finish()

    assert fields == {"output": "ab€", "output_bytes": 7, "dropped_bytes": 2}
    assert sink.text() == "ab€"


async def test_a_failing_sink_does_not_lose_output() -> None:
    async def broken(stream: str, text: str) -> None:
        raise RuntimeError("log bus down")

    collector = OutputCollector(cap_bytes=100, sink=broken, run_id="r")
    await collector.feed("stdout", b"one ")
    await collector.feed("stderr", b"two")

    assert (await collector.finish())["output"] == "one two"


def test_make_sandboxes_builds_the_configured_backends(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path, node_name="n7", executor={"sandboxes": ["process"]})
    assert list(make_sandboxes(settings)) == ["process"]

    both = make_sandboxes(load_settings(home=tmp_path, node_name="n7", executor={"docker_url": "tcp://d:2375"}))
    assert isinstance(both["process"], ProcessSandbox) and both["process"].hide[0] == tmp_path.resolve()
    assert isinstance(both["docker"], DockerSandbox)
    assert (both["docker"].node_name, both["docker"].url) == ("n7", "tcp://d:2375")
