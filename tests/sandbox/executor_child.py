"""A stand-in executor for "the executor died mid-attempt" tests.

    python -m tests.sandbox.executor_child {process|process-staged|process-gated|docker} NODE MARKER WORK_ROOT

starts the backend, runs `sleep MARKER` (after printing "started") and waits forever; the
test SIGKILLs it and checks what the attempt left behind. With `process-staged` the executor
prepares the attempt's work dir (a staged dir on the host); with `process-gated` the sandbox
is also built ahead, its agent (which leaves `ran` in the staged dir) held at a gate that never
opens, and "started" is printed once the gate waits.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from kjob.executor.sandbox import DockerSandbox, ProcessSandbox, Sandbox
from kjob.model.job import SandboxSpec
from tests.sandbox.conftest import make_launch, processes_with
from tests.support.images import IMAGE


async def main(backend: str, node: str, marker: str, work_root: Path) -> None:
    sandbox: Sandbox
    if backend == "docker":
        sandbox, spec = DockerSandbox(node), SandboxSpec(backend="docker", image=IMAGE)
    else:
        sandbox, spec = ProcessSandbox(), SandboxSpec()
    await sandbox.start()
    changes: dict[str, object] = {}
    if backend.startswith("process-"):
        async def prepare(workdir: Path) -> dict[str, str]:
            (workdir / "given").write_text("from the executor")
            return {}

        changes = {"prepare": prepare}

    async def relay(stream: str, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if backend == "process-gated":
        launch = make_launch(["sh", "-c", f"echo ran > ran; sleep {marker}"], work_root, spec,
                             gate=asyncio.get_running_loop().create_future(),
                             # as the executor's: a watchdog to arm, so bwrap does not die with us
                             on_spawn=lambda pgid, status_fd: None, **changes)
        attempt = asyncio.create_task(sandbox.run(launch, relay))
        while not any("kjob-gate" in p for p in processes_with(f"sleep {marker}")):
            await asyncio.sleep(0.02)
        print("started", flush=True)
        await attempt
        return

    launch = make_launch(["sh", "-c", f"echo started; sleep {marker} & sleep {marker}"], work_root, spec, **changes)
    await sandbox.run(launch, relay)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])))
