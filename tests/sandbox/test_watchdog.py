"""The executor's watchdog, a process of its own: it kills an agent's process group once the
executor stops extending the agent's deadline, and never one whose deadline is kept."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import pytest

from kjob.executor.watchdog import Watchdog
from tests.support.pipeline import until


async def _agent() -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec("sleep", "60", start_new_session=True)


async def _gone(proc: asyncio.subprocess.Process) -> bool:
    return proc.returncode is not None


async def test_a_deadline_not_extended_kills_the_group_and_a_kept_one_does_not():
    dog = Watchdog()
    await dog.start()
    kept, dropped, disarmed = await _agent(), await _agent(), await _agent()
    waiters = [asyncio.create_task(p.wait()) for p in (kept, dropped, disarmed)]
    try:
        start = time.monotonic()
        for key, proc in (("kept", kept), ("dropped", dropped), ("disarmed", disarmed)):
            dog.arm(key, proc.pid, start + 1.0)
        dog.disarm("disarmed")

        async def extend_for(seconds: float) -> None:
            while time.monotonic() < start + seconds:
                dog.extend("kept", time.monotonic() + 1.0)
                await asyncio.sleep(0.2)
        await extend_for(2.5)
        assert dropped.returncode == -signal.SIGKILL, "the agent whose deadline passed still runs"
        assert kept.returncode is None and disarmed.returncode is None
    finally:
        await dog.close()
    # The executor's end (its pipe closed) kills what is still armed, not what was disarmed.
    await until(lambda: _gone(kept), 5, "the armed agent killed when its executor ended")
    assert disarmed.returncode is None
    os.killpg(disarmed.pid, signal.SIGKILL)
    await asyncio.gather(*waiters)


async def test_the_watchdog_runs_on_while_its_executor_is_paused(tmp_path):
    """The point of it: a paused executor (SIGSTOP) extends nothing, and its agent is killed."""
    script = tmp_path / "executor.py"
    script.write_text(
        "import asyncio, subprocess, sys, time\n"
        "from kjob.executor.watchdog import Watchdog\n"
        "async def main():\n"
        "    dog = Watchdog(); await dog.start()\n"
        "    agent = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
        "    print(agent.pid, flush=True)\n"
        "    while True:\n"
        "        dog.arm('a', agent.pid, time.monotonic() + 1.0)\n"
        "        await asyncio.sleep(0.2)\n"
        "asyncio.run(main())\n")
    executor = await asyncio.create_subprocess_exec(
        os.environ.get("PYTHON", __import__("sys").executable), str(script), stdout=asyncio.subprocess.PIPE)
    assert executor.stdout is not None
    agent_pid = int((await asyncio.wait_for(executor.stdout.readline(), 20)).decode())

    async def agent_alive() -> bool:
        try:
            os.kill(agent_pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{agent_pid}/stat") as stat:  # a zombie has ended
            return stat.read().split(")")[-1].split()[0] != "Z"
    try:
        await asyncio.sleep(2.0)
        assert await agent_alive(), "killed while its executor extended the deadline"
        executor.send_signal(signal.SIGSTOP)
        await until(lambda: _not(agent_alive()), 5, "the paused executor's agent killed by the watchdog")
    finally:
        executor.send_signal(signal.SIGCONT)
        executor.kill()
        await executor.wait()


async def _not(check) -> bool:
    return not await check


@pytest.mark.parametrize("fate", ["dies", "pauses"])
async def test_an_agent_its_executor_never_armed_by_group_is_still_killed(tmp_path, fate):
    """Under bwrap the executor arms the watchdog once, with bwrap's status pipe before the
    spawn, and never tells it the process group. The executor dies (or is paused) while the
    agent runs: the watchdog finds the group from the pipe, which it reads only then (or at
    the deadline), and kills the agent at its deadline (it would otherwise outlive everything:
    bwrap no longer dies with its parent when a watchdog watches it)."""
    marker = str(70_000 + os.getpid() % 9_000 + (0 if fate == "dies" else 9_000))
    end = "os._exit, 9" if fate == "dies" else "os.kill, os.getpid(), signal.SIGSTOP"
    script = tmp_path / "executor.py"
    script.write_text(
        "import asyncio, os, signal, time\n"
        "from datetime import timedelta\n"
        "from pathlib import Path\n"
        "from kjob.executor.watchdog import Watchdog\n"
        "from kjob.executor.sandbox.process import ProcessSandbox\n"
        "from kjob.executor.sandbox.base import Launch\n"
        "from kjob.model.job import SandboxSpec\n"
        "async def main():\n"
        "    dog = Watchdog(); await dog.start()\n"
        "    box = ProcessSandbox(); await box.start()\n"
        "    def armed(pgid, status_fd):\n"
        "        assert pgid is None, 'armed by group under bwrap'\n"
        "        dog.arm('a', None, time.monotonic() + 2.0, status_fd=status_fd)\n"
        f"        asyncio.get_running_loop().call_later(0.5, {end})  # the executor dies, or is paused\n"
        f"    launch = Launch(run_id='r', tenant='t', job_slug='j', attempt=1, argv=['sleep', '{marker}'],\n"
        "                    stdin=None, env={}, spec=SandboxSpec(), timeout=timedelta(seconds=60),\n"
        f"                    output_cap_bytes=1000, work_root=Path({str(tmp_path / 'work')!r}), on_spawn=armed)\n"
        "    async def out(stream, text): pass\n"
        "    await box.run(launch, out)\n"
        "asyncio.run(main())\n")
    executor = await asyncio.create_subprocess_exec(os.environ.get("PYTHON", __import__("sys").executable), str(script))

    async def agents() -> list[str]:
        out = await asyncio.create_subprocess_exec("pgrep", "-f", f"sleep {marker}$", stdout=asyncio.subprocess.PIPE)
        return (await out.communicate())[0].decode().split()
    try:
        if fate == "dies":
            assert await asyncio.wait_for(executor.wait(), 30) == 9
        else:
            await until(lambda: _stopped(executor.pid), 30, "the executor paused")
        assert await agents(), "the agent did not outlive its executor's end: nothing to watch"
        await until(lambda: _not(agents()), 10, "the orphaned agent killed by the watchdog at its deadline")
    finally:
        if executor.returncode is None:
            executor.kill()
            await executor.wait()


async def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] == "T"


@pytest.mark.parametrize("watchdog", ["keeps up", "paused"])
async def test_disarmed_attempts_are_never_killed_however_many_end_at_once(watchdog):
    """Disarms ride with the next message (or go within 50 ms): not one of 300 attempts
    disarmed together is killed when their deadlines pass a moment later. Paused, the
    watchdog reads nothing and its socket fills: what the executor sends then waits, in
    order, and is not dropped."""
    dog = Watchdog()
    await dog.start()
    assert dog.pid is not None
    agents = [await _agent() for _ in range(300)]
    try:
        if watchdog == "paused":
            os.kill(dog.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 1.5
        for k, proc in enumerate(agents):
            dog.arm(f"a{k}", proc.pid, deadline)
        for k in range(len(agents)):
            dog.disarm(f"a{k}")
        await asyncio.sleep(0.2)
        if watchdog == "paused":
            assert dog._backlog, "the paused watchdog's socket never filled: nothing tested"  # noqa: SLF001
            os.kill(dog.pid, signal.SIGCONT)
        await asyncio.sleep(max(deadline - time.monotonic(), 0) + 1.0)
        killed = [p.pid for p in agents if p.returncode is not None]
        assert not killed, f"{len(killed)} disarmed agents were killed"
    finally:
        os.kill(dog.pid, signal.SIGCONT)
        await dog.close()
        for proc in agents:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.gather(*(p.wait() for p in agents))
