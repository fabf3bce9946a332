"""What every backend promises (the Sandbox port), checked on each of them."""

from __future__ import annotations

import asyncio
import secrets
from datetime import timedelta

import pytest

from tests.sandbox.conftest import Backend, Sink

ISOLATED = ["process-bwrap", pytest.param("docker", marks=pytest.mark.docker)]


async def test_output_exit_code_and_stdin_come_back(backend: Backend) -> None:
    sink = Sink()
    launch = backend.launch(["sh", "-c", "echo to-out; echo to-err >&2; cat; exit 7"], stdin=b"from stdin\n")

    outcome = await backend.sandbox.run(launch, sink)

    assert (outcome.exit_code, outcome.timed_out, outcome.start_error) == (7, False, None)
    assert sink.text("stdout") == "to-out\nfrom stdin\n"
    assert sink.text("stderr") == "to-err\n"
    assert sorted(outcome.output.splitlines()) == ["from stdin", "to-err", "to-out"]
    assert (outcome.output_bytes, outcome.dropped_bytes) == (len(outcome.output.encode()), 0)


async def test_success_is_exit_code_zero(backend: Backend) -> None:
    outcome = await backend.sandbox.run(backend.launch(["true"]), Sink())
    assert (outcome.exit_code, outcome.reason, outcome.start_error) == (0, None, None)


async def test_host_environment_does_not_leak(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KJOB_SECRET_TEST", "s3cret-value")
    launch = backend.launch(["sh", "-c", "env; echo cwd=$(pwd)"], env={"JOB_VAR": "from-the-job"})

    outcome = await backend.sandbox.run(launch, Sink())

    assert outcome.exit_code == 0, outcome.output
    assert "KJOB_SECRET_TEST" not in outcome.output and "s3cret-value" not in outcome.output
    assert "JOB_VAR=from-the-job" in outcome.output.splitlines()
    lines = dict(line.split("=", 1) for line in outcome.output.splitlines() if "=" in line)
    assert lines["HOME"] == lines["cwd"]
    if backend.workdir:
        assert lines["cwd"] == backend.workdir
    else:
        assert lines["cwd"].startswith(str(backend.work_root))


async def test_output_beyond_the_cap_is_counted_not_kept(backend: Backend) -> None:
    sink = Sink()
    launch = backend.launch(["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x"], output_cap_bytes=1024)

    outcome = await backend.sandbox.run(launch, sink)

    assert outcome.exit_code == 0
    assert outcome.output == "x" * 1024
    assert (outcome.output_bytes, outcome.dropped_bytes) == (100_000, 100_000 - 1024)
    assert sink.text() == outcome.output  # the live stream is what is kept, no more


async def test_missing_command_is_a_start_error(backend: Backend) -> None:
    outcome = await backend.sandbox.run(backend.launch(["kjob-no-such-agent", "--print"]), Sink())

    assert outcome.exit_code is None and not outcome.timed_out
    assert outcome.start_error and "kjob-no-such-agent" in outcome.start_error


async def test_timeout_kills_everything_the_attempt_started(backend: Backend) -> None:
    marker = str(40_000 + secrets.randbelow(20_000))  # `sleep <marker>` is findable on the host
    sink = Sink()
    # The agent ignores SIGTERM and leaves a child behind: only the SIGKILL escalation ends them.
    launch = backend.launch(
        ["sh", "-c", f"trap '' TERM; sleep {marker} & echo started; wait"], timeout=timedelta(seconds=1)
    )
    attempt = asyncio.create_task(backend.sandbox.run(launch, sink))
    await sink.wait_for("started")
    assert await backend.leftovers(launch.run_id, marker), "the check must see the attempt while it runs"

    outcome = await attempt

    assert outcome.timed_out and outcome.exit_code is None
    assert "1s timeout" in (outcome.reason or "")
    assert outcome.output == "started\n"
    assert await backend.leftovers(launch.run_id, marker) == []


async def test_cancelling_the_run_kills_the_attempt(backend: Backend) -> None:
    marker = str(40_000 + secrets.randbelow(20_000))
    sink = Sink()
    launch = backend.launch(["sh", "-c", f"sleep {marker} & echo started; wait"])
    attempt = asyncio.create_task(backend.sandbox.run(launch, sink))
    await sink.wait_for("started")

    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt

    assert await backend.leftovers(launch.run_id, marker) == []


@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
async def test_network_none_blocks_outbound_connections(
    backend: Backend, listener: tuple[str, int, list[bytes]]
) -> None:
    host, port, received = listener
    # The same command reaches the listener when the network is open: the blocked run proves something.
    reached = await backend.sandbox.run(backend.launch(backend.connect(host, port), spec={"network": "host"}), Sink())
    assert reached.exit_code == 0, reached.output
    assert len(received) == 1

    blocked = await backend.sandbox.run(backend.launch(backend.connect(host, port)), Sink())
    assert blocked.exit_code not in (0, None), blocked.output
    assert len(received) == 1


@pytest.mark.parametrize("backend", ["process-bwrap", "process-bare", pytest.param("docker", marks=pytest.mark.docker)],
                         indirect=True)
async def test_host_network_only_for_tenants_the_operator_lists(backend: Backend) -> None:
    # The fixtures' sandboxes list "acme" (HOST_NETWORK_TENANTS); "beta" is not listed.
    outcome = await backend.sandbox.run(backend.launch(["true"], tenant="beta", spec={"network": "host"}), Sink())

    assert outcome.start_error and "executor.host_network_tenants" in outcome.start_error and "'beta'" in outcome.start_error
