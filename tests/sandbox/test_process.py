"""The process backend: process groups, bubblewrap isolation, rlimits, and its absence."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from kjob.errors import ServerError
from kjob.executor.sandbox import ProcessSandbox
from kjob.executor.sandbox.process import DEFAULT_PIDS, NOT_STARTED
from kjob.executor.sandbox.staging import REUSE_MAX_ENTRIES, STAGING_ROOT
from kjob.model.job import SandboxSpec
from tests.sandbox.conftest import Backend, Sink, dead_executor, eventually, make_launch, processes_with

BOTH = ["process-bwrap", "process-bare"]


def pgid_of(marker: str) -> int:
    """The process group of the host processes whose command line holds `marker`."""
    groups = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes() and int(pid) != os.getpid():
                groups.add(os.getpgid(int(pid)))
        except OSError:
            continue
    assert len(groups) == 1, f"expected one process group running {marker}, found {groups}"
    return groups.pop()


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("backend", BOTH, indirect=True)
async def test_timeout_leaves_no_process_in_the_group(backend: Backend) -> None:
    marker = str(60_000 + secrets.randbelow(20_000))
    sink = Sink()
    launch = backend.launch(
        ["sh", "-c", f"trap '' TERM; sleep {marker} & sleep {marker} & echo started; wait"],
        timeout=timedelta(seconds=1),
    )
    attempt = asyncio.create_task(backend.sandbox.run(launch, sink))
    await sink.wait_for("started")
    pgid = pgid_of(marker)
    assert pgid != os.getpgid(0), "the attempt must lead a process group of its own"

    outcome = await attempt

    assert outcome.timed_out
    assert not group_exists(pgid)


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A host directory outside /tmp: the sandbox's /tmp is a private tmpfs, where a file
    would be missing (and a write succeed) whatever the sandbox does to the host filesystem."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as path:
        yield Path(path)


@pytest.mark.parametrize("backend", ["process-bwrap"], indirect=True)
async def test_host_filesystem_is_read_only_outside_the_work_dir(backend: Backend, host_dir: Path) -> None:
    host_file = host_dir / "host-file"
    host_file.write_text("original")
    script = (f"cat {host_file}; echo changed > {host_file}; echo host=$?; echo x > /usr/kjob-test; echo usr=$?; "
              "echo x > new; echo work=$?; echo x > /tmp/t; echo tmp=$?")

    outcome = await backend.sandbox.run(backend.launch(["sh", "-c", script]), Sink())

    results = outcome.output.split()
    assert "host=0" not in results and "usr=0" not in results, outcome.output
    assert "work=0" in results and "tmp=0" in results, outcome.output
    assert "original" not in outcome.output  # /var is not in the sandbox at all
    assert host_file.read_text() == "original" and not Path("/usr/kjob-test").exists()


async def test_the_kjob_home_is_hidden_from_agents(host_dir: Path) -> None:
    """The kjob home is never in a sandbox, not even under a directory the operator shares."""
    home = host_dir / "kjob-home"
    home.mkdir()
    (home / "admin.token").write_text("top-secret-token")
    host_dir.chmod(0o755)  # the agent's uid may enter the shared dir
    home.chmod(0o755)
    (home / "admin.token").chmod(0o644)
    sharing = ProcessSandbox(extra_binds=[host_dir])
    hiding = ProcessSandbox(extra_binds=[host_dir], hide=[home])
    await sharing.start()
    await hiding.start()
    launch = make_launch(["sh", "-c", f"cat {home}/admin.token"], home / "work")

    hidden = await hiding.run(launch, Sink())
    visible = await sharing.run(launch, Sink())  # the same run, without `hide`

    assert "top-secret-token" not in hidden.output and "No such file" in hidden.output
    assert "top-secret-token" in visible.output


@pytest.mark.parametrize("backend", BOTH, indirect=True)
async def test_work_dir_is_fresh_per_attempt_and_removed_after(backend: Backend) -> None:
    outcome = await backend.sandbox.run(backend.launch(["sh", "-c", "ls -A; echo data > file; pwd"]), Sink())

    workdir = Path(outcome.output.splitlines()[-1])
    assert outcome.output.splitlines()[0] == str(workdir)  # `ls -A` printed nothing: it was empty
    assert workdir.parent == backend.work_root
    assert not workdir.exists()


async def test_signal_death_is_reported_with_the_signal(
    bwrap_sandbox: ProcessSandbox, bare_sandbox: ProcessSandbox, tmp_path: Path
) -> None:
    launch = make_launch(["sh", "-c", "kill -KILL $$"], tmp_path)

    bare = await bare_sandbox.run(launch, Sink())
    wrapped = await bwrap_sandbox.run(launch, Sink())

    assert bare.exit_code == -9 and "SIGKILL" in (bare.reason or "")
    assert wrapped.exit_code == 137 and "128+9" in (wrapped.reason or "") and "SIGKILL" in (wrapped.reason or "")


@pytest.mark.parametrize("backend", BOTH, indirect=True)
async def test_memory_limit_bounds_the_agent(backend: Backend) -> None:
    hog = ["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"]  # a 256 MiB buffer, touched

    limited = await backend.sandbox.run(backend.launch(hog, spec={"memory": "64m"}), Sink())
    unlimited = await backend.sandbox.run(backend.launch(hog), Sink())

    assert limited.exit_code not in (0, None)
    assert isinstance(backend.sandbox, ProcessSandbox)
    if backend.sandbox.memory_cgroups:  # a real bound: the kernel kills the process at 64 MiB resident
        assert limited.reason == "OOM killed (memory limit 64m)" and limited.oom_killed, limited
    else:  # an address-space rlimit: the allocation fails
        assert "memory exhausted" in limited.output
    assert unlimited.exit_code == 0, unlimited.output


async def test_memory_is_a_cgroup_where_the_node_allows_it(bwrap_sandbox: ProcessSandbox, tmp_path: Path) -> None:
    """On a node with a writable v1 memory hierarchy (CI's and this one's) and a root executor,
    the bound is a cgroup: a runtime that reserves address space but touches little still starts."""
    if os.geteuid() != 0 or not Path("/sys/fs/cgroup/memory").is_dir():
        pytest.skip("no v1 memory hierarchy to write here")
    assert bwrap_sandbox.memory_cgroups and "memory by cgroup" in bwrap_sandbox.status()["isolation"]
    reserve = ["/usr/bin/python3", "-c", "import mmap; m = mmap.mmap(-1, 512 * 2**20); m[:4096] = b'x' * 4096; print('ok')"]

    outcome = await bwrap_sandbox.run(make_launch(reserve, tmp_path, SandboxSpec(memory="64m")), Sink())

    assert outcome.exit_code == 0 and "ok" in outcome.output, outcome


async def test_without_bwrap_it_says_so_or_refuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without bwrap, as on a node without bubblewrap

    with pytest.raises(ServerError, match="bubblewrap"):
        await ProcessSandbox(require_isolation=True).start()

    lenient = ProcessSandbox()
    with caplog.at_level(logging.WARNING):
        await lenient.start()
    assert not lenient.isolated
    assert "not installed" in lenient.status()["isolation"]
    assert "WITHOUT isolation" in caplog.text


async def test_agents_die_with_a_killed_executor(bwrap_sandbox: ProcessSandbox, tmp_path: Path) -> None:
    marker = str(80_000 + secrets.randbelow(10_000))

    await dead_executor("process", "unused", marker, tmp_path)

    async def gone() -> bool:
        return not processes_with(f"sleep {marker}")

    await eventually(gone)  # bwrap --die-with-parent, and its pid namespace takes the children


@pytest.mark.skipif(os.geteuid() != 0, reason="the per-attempt uids are for an executor that runs as root")
async def test_a_root_executor_runs_each_attempt_as_a_uid_of_its_own(bwrap_sandbox: ProcessSandbox, tmp_path: Path) -> None:
    marker = str(90_000 + secrets.randbelow(9_000))
    sinks = [Sink(), Sink()]
    attempts = [asyncio.create_task(bwrap_sandbox.run(make_launch(["sh", "-c", f"id -u; echo started; sleep {marker}"],
                                                                  tmp_path, timeout=timedelta(seconds=3)), sink))
                for sink in sinks]
    for sink in sinks:
        await sink.wait_for("started")
    # Counted from outside: the host kernel's view of the agents' processes.
    host_uids = set()
    for line in processes_with(f"sleep {marker}"):
        pid = line.split()[1].rstrip(":")
        host_uids.add(int(Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split()[1]))
    for attempt in attempts:
        attempt.cancel()
    await asyncio.gather(*attempts, return_exceptions=True)

    inside = {int(sink.text().split()[0]) for sink in sinks}
    default_pids = await bwrap_sandbox.run(make_launch(["sh", "-c", "grep processes /proc/self/limits"], tmp_path), Sink())
    assert default_pids.output.split()[2:4] == [str(DEFAULT_PIDS)] * 2  # per attempt: the uid is its own
    assert len(host_uids) == 2 and host_uids == inside, (host_uids, inside)
    assert all(uid >= 200_000 for uid in host_uids)


async def test_a_prepared_work_dir_leaves_nothing_behind(tmp_path: Path) -> None:
    """A work dir the executor prepares (a workspace, $KJOB_RESULT) is staged on the host, on a
    tmpfs of its own. An attempt that wrote a big tree leaves neither its files nor the mount;
    one that left a few entries has its dir emptied, links removed and never followed, and the
    next attempt gets it empty; once the sandbox closes, no staged dir or mount is left."""
    sandbox = ProcessSandbox()
    await sandbox.start()
    assert sandbox.isolated, sandbox.status()
    staging = Path(STAGING_ROOT)
    before = {p.name for p in staging.glob("kjob-work-*")}
    bait = tmp_path / "host-file"
    bait.write_text("the host's")
    bait.chmod(0o666)
    seen: list[tuple[Path, list[str]]] = []

    async def prepare(workdir: Path) -> dict[str, str]:
        seen.append((workdir, sorted(os.listdir(workdir))))
        (workdir / "given").write_text("from the executor")
        return {"GIVEN": str(workdir / "given")}

    async def collect(workdir: Path) -> None:
        seen[-1] = (workdir, seen[-1][1])

    async def attempt(script: str) -> Path:
        launch = make_launch(["sh", "-c", script], tmp_path / "work", prepare=prepare, collect=collect)
        outcome = await sandbox.run(launch, Sink())
        assert outcome.exit_code == 0, outcome.output
        assert "from the executor" in outcome.output
        return seen[-1][0]

    try:
        many = " ".join(str(i) for i in range(REUSE_MAX_ENTRIES + 1))
        big = await attempt(f'cat "$GIVEN"; mkdir many; for i in {many}; do echo $i > many/$i; done')
        assert not big.exists()
        assert str(big) not in Path("/proc/self/mountinfo").read_text()

        # The staged dir is bound inside, where the agent cannot reach the host file: the link
        # it leaves points at the host path, which the executor's clean-up must not follow.
        small = await attempt(f'cat "$GIVEN"; ln -s {bait} link; mkdir -p d/e; ln -s {bait.parent} d/e/dir; '
                              'chmod 0777 .; echo secret > d/left')
        assert small.exists() and os.listdir(small) == [], "a small tree is emptied for the next attempt"
        assert bait.read_text() == "the host's" and tmp_path.exists()
        assert (small.stat().st_mode & 0o777, small.stat().st_uid) == (0o700, os.geteuid())

        reused = await attempt('cat "$GIVEN"; ls -A; test ! -e d/left')
        assert reused == small and seen[-1][1] == [], "the next attempt starts in an empty dir"
        assert str(small) in Path("/proc/self/mountinfo").read_text(), "still its own bounded tmpfs"
    finally:
        await sandbox.close()
    assert {p.name for p in staging.glob("kjob-work-*")} == before
    mounted = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    assert {m for m in mounted if "/kjob-work-" in m} <= {str(staging / name) for name in before}
    assert not (tmp_path / "work").exists() or list((tmp_path / "work").iterdir()) == []


async def test_concurrent_attempts_start_no_thread_per_child(bwrap_sandbox: ProcessSandbox, tmp_path: Path) -> None:
    """Each agent's exit comes by its pidfd to the event loop: no waitpid thread per child, which
    at 100 runs/s cost the executor a third of its spawning CPU."""
    async def one(i: int) -> int | None:
        outcome = await bwrap_sandbox.run(make_launch(["sh", "-c", f"sleep 0.3; exit {i}"], tmp_path), Sink())
        return outcome.exit_code

    runs = asyncio.gather(*(one(i) for i in range(12)))
    await asyncio.sleep(0.2)
    waiting = [t.name for t in threading.enumerate() if "waitpid" in t.name]
    assert await runs == list(range(12))  # each exit code reaches its own attempt
    assert waiting == []


async def test_staged_dirs_of_a_killed_executor_are_reclaimed_by_the_next_start(tmp_path: Path) -> None:
    """An executor SIGKILLed mid-attempt cannot unmount its staged dir: the next process
    sandbox to start on the host does, and leaves the dirs of a live executor alone."""
    live = ProcessSandbox()
    await live.start()
    seen: list[Path] = []

    async def prepare(workdir: Path) -> dict[str, str]:
        seen.append(workdir)
        return {}

    try:
        outcome = await live.run(make_launch(["true"], tmp_path / "live", prepare=prepare), Sink())
        assert outcome.exit_code == 0 and seen[0].exists(), "the live sandbox holds a pooled staged dir"

        pid = await dead_executor("process-staged", "unused", str(70_000 + secrets.randbelow(9_000)), tmp_path / "dead")
        left = list(Path(STAGING_ROOT).glob(f"kjob-work-{pid}-*"))
        assert len(left) == 1 and str(left[0]) in Path("/proc/self/mountinfo").read_text(), left

        later = ProcessSandbox()
        await later.start()
        await later.close()
        assert not left[0].exists()
        assert str(left[0]) not in Path("/proc/self/mountinfo").read_text()
        assert seen[0].exists() and str(seen[0]) in Path("/proc/self/mountinfo").read_text(), "a live owner's dir stays"
    finally:
        await live.close()
    assert not seen[0].exists()


async def gated_attempt(sandbox: ProcessSandbox, tmp_path: Path, marker: str, gate: asyncio.Future,
                        staged: list[Path], **changes) -> asyncio.Task:
    """An attempt built ahead (a warm start) whose agent leaves `ran` in its work dir, staged
    on the host where the test can look, then sleeps `marker`; it waits on `gate`."""
    async def prepare(workdir: Path) -> dict[str, str]:
        staged.append(workdir)
        return {}

    launch = make_launch(["sh", "-c", f"echo ran > ran; sleep {marker}"], tmp_path, prepare=prepare, gate=gate,
                         **changes)
    assert sandbox.gates(launch)
    return asyncio.create_task(sandbox.run(launch, Sink()))


async def test_a_warm_start_runs_its_agent_only_when_its_gate_opens(bwrap_sandbox: ProcessSandbox, tmp_path: Path) -> None:
    """A sandbox built ahead of its claim holds its agent back: nothing of the agent runs while
    the gate is shut, a "no" ends it unstarted, a "yes" starts it with its full timeout."""
    marker = str(60_000 + secrets.randbelow(9_000))
    staged: list[Path] = []
    refused: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    task = await gated_attempt(bwrap_sandbox, tmp_path, marker, refused, staged)

    async def built() -> bool:
        return any("kjob-gate" in p for p in processes_with(f"sleep {marker}"))

    await eventually(built)
    assert not (staged[0] / "ran").exists(), "the agent ran before its gate opened"
    refused.set_result(False)
    outcome = await task
    assert outcome.start_error == NOT_STARTED and outcome.exit_code is None
    assert not processes_with(f"sleep {marker}")

    opened: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    staged.clear()
    task = await gated_attempt(bwrap_sandbox, tmp_path, "0.5", opened, staged, timeout=timedelta(seconds=1))
    async def prepared() -> bool:
        return bool(staged)

    await eventually(prepared)
    await asyncio.sleep(1.2)  # longer than the timeout: the timeout runs from the gate, not the build
    opened.set_result(True)
    outcome = await task
    assert outcome.exit_code == 0 and not outcome.timed_out, outcome


async def test_a_warm_start_whose_executor_dies_never_runs_its_agent(tmp_path: Path) -> None:
    """The gate reads "go" from a pipe only the executor writes: an executor killed while a
    sandbox waits at the gate closes the pipe, and the agent never starts (bwrap's own
    --block-fd would run it at end of file)."""
    marker = str(50_000 + secrets.randbelow(9_000))
    pid = await dead_executor("process-gated", "unused", marker, tmp_path)
    left = list(Path(STAGING_ROOT).glob(f"kjob-work-{pid}-*"))
    assert len(left) == 1, left

    async def gone() -> bool:
        return not processes_with(f"sleep {marker}")

    await eventually(gone)
    assert not (left[0] / "ran").exists(), "the agent of a sandbox built ahead ran after its executor died"
    later = ProcessSandbox()
    await later.start()  # reclaims the dead executor's staged dir
    await later.close()
