"""The executor's own CPU per attempt of the process sandbox, without the rest of kjob.

    .venv/bin/python bench/sandbox_cpu.py [--runs 800] [--in-flight 8]

Runs the built-in `shell` agent's `true` through ProcessSandbox.run (bubblewrap), `--in-flight`
at once, three times: plain (a tmpfs work dir inside bwrap, nothing on the host); prepared as
the executor prepares every attempt of a registered agent (kjob.executor.agent_run:
$KJOB_RESULT and a private HOME staged on the host, read back after); and watched, prepared
and armed with the executor's watchdog (kjob.executor.watchdog), disarmed after. Printed: the
CPU of this process per attempt (all its threads; the sandbox's own processes are children
and not counted), the watchdog process's, and the attempts per second. It isolates what the sandbox costs the executor from the claim, the
messages and the ledger, which bench/fastpath.py measures together.

2026-12-02 (2 cores, quiet, 8 in flight), before and after the staged dirs were pooled and
small trees removed without a worker thread (kjob/executor/sandbox/staging.py):
plain 2.54 / 2.68 -> 1.82 / 1.91 ms, prepared 3.98 / 4.04 -> 2.34 / 2.09 ms per attempt.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import cpu_s  # noqa: E402
from pipeline import line  # noqa: E402
from kjob.executor.agent_run import AgentRun  # noqa: E402
from kjob.executor.agents import AgentRegistry  # noqa: E402
from kjob.executor.sandbox import Launch, ProcessSandbox  # noqa: E402
from kjob.executor.watchdog import Watchdog  # noqa: E402
from kjob.model.job import parse_job  # noqa: E402


async def attempts(sandbox: ProcessSandbox, agents: AgentRegistry, work_root: Path, *, prepared: bool,
                   runs: int, in_flight: int, watchdog: Watchdog | None = None) -> tuple[float, float, float]:
    """(executor CPU ms per attempt, attempts/s, the watchdog process's CPU ms per attempt).
    With a watchdog, each attempt is armed with it and disarmed after, as the executor does."""
    job = parse_job({"slug": "cpu", "agent": "shell", "prompt": "true", "schedule": "@every 1h",
                     "sandbox": {"backend": "process"}})
    agent = agents.get("shell")
    started = 0

    async def sink(stream: str, text: str) -> None:
        pass

    async def worker() -> None:
        nonlocal started
        while started < runs:
            started += 1
            run_id = f"cpu{started}"
            argv, stdin, env = agents.render(agent, prompt="true", run_id=run_id, slug="cpu", tenant="bench", attempt=1)
            hooks = {}
            if prepared:
                agent_run = AgentRun(agent, job, stdout_cap=1 << 20, clone_timeout_s=60, clone_max_bytes=1 << 30,
                                     local_roots=[])
                hooks = {"prepare": agent_run.prepare, "collect": agent_run.collect}
            key = f"{run_id}.1"
            if watchdog is not None:
                hooks["on_spawn"] = lambda pgid, status_fd, key=key, run_id=run_id: watchdog.arm(
                    key, pgid, time.monotonic() + 60, status_fd=status_fd, run_id=run_id, attempt=1, node="bench")
            launch = Launch(run_id=run_id, tenant="bench", job_slug="cpu", attempt=1, argv=argv, stdin=stdin, env=env,
                            spec=job.sandbox, timeout=timedelta(seconds=60), output_cap_bytes=1 << 20,
                            work_root=work_root, **hooks)
            outcome = await sandbox.run(launch, sink)
            if watchdog is not None:
                watchdog.disarm(key)
            assert outcome.exit_code == 0, outcome

    dog = (lambda: cpu_s(watchdog.pid)) if watchdog is not None else (lambda: 0.0)
    cpu, wall, dog_cpu = time.process_time(), time.perf_counter(), dog()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    cpu, wall, dog_cpu = time.process_time() - cpu, time.perf_counter() - wall, dog() - dog_cpu
    return cpu * 1000 / runs, runs / wall, dog_cpu * 1000 / runs


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=800)
    parser.add_argument("--in-flight", type=int, default=8)
    args = parser.parse_args()
    sandbox = ProcessSandbox()
    await sandbox.start()
    if not sandbox.isolated:
        sys.exit(f"bubblewrap does not isolate here: {sandbox.status()}; run .ci/docker.sh")
    agents = AgentRegistry.load(None)
    print(f"process sandbox, `true` by the shell agent, {args.runs} attempts, {args.in_flight} in flight")
    watchdog = Watchdog()  # no database: nothing here is ever concluded (a minute's deadline)
    await watchdog.start()
    try:
        with tempfile.TemporaryDirectory(prefix="kjob-bench-") as work_root:
            for name, prepared, dog in (("plain", False, None), ("prepared", True, None),
                                        ("watched", True, watchdog)):
                ms, rate, dog_ms = await attempts(sandbox, agents, Path(work_root), prepared=prepared, runs=args.runs,
                                                  in_flight=args.in_flight, watchdog=dog)
                line(f"{name}: executor CPU per attempt (ms)", f"{ms:.2f}")
                if dog is not None:
                    line(f"{name}: the watchdog's CPU per attempt (ms)", f"{dog_ms:.2f}")
                line(f"{name}: attempts/s", f"{rate:.0f}")
    finally:
        await watchdog.close()
        await sandbox.close()


if __name__ == "__main__":
    asyncio.run(main())
