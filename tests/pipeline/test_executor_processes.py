"""`executor.processes`: a node runs its executors in several processes (both cores), each
claiming under a name of its own, each slot once; and the extra processes die with their node."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sqlalchemy import select

from kjob.embedded._process import _children
from kjob.store.tables import run_attempts
from tests.support.nodes import SchedulerProcess
from tests.support.pipeline import create_job, until


def _executor_children(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"from kjob.cli.main import main" in cmd and b"executor" in cmd:
            found.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_two_executor_processes_share_the_runs_once_each_and_die_with_their_node(
        tmp_path, fresh_nats, database_url, engine):
    for i in range(4):
        await create_job(engine, slug=f"beat-{i}", prompt="sleep 0.2", schedule="@every 1s")
    node = SchedulerProcess("p", tmp_path, {
        "KJOB_NATS_URL": fresh_nats.url, "KJOB_DATABASE_URL": database_url,
        "KJOB_EXECUTOR__SANDBOXES": '["process"]', "KJOB_EXECUTOR__PROCESSES": "2",
        "KJOB_EXECUTOR__CONCURRENCY": "4",
    }, roles="ticker,executor").start()
    try:
        async def by_executor() -> Counter:
            async with engine.connect() as conn:
                rows = (await conn.execute(select(run_attempts.c.executor, run_attempts.c.status))).all()
            return Counter(r.executor for r in rows if r.status == "succeeded")

        async def both() -> Counter | None:
            assert node.proc.poll() is None, node.logs()
            seen = await by_executor()
            return seen if seen["p"] >= 3 and seen["p.1"] >= 3 else None

        await until(both, 60, "runs finished by both executor processes, p and p.1")
        async with engine.connect() as conn:
            attempts = Counter((await conn.execute(select(run_attempts.c.run_id))).scalars())
        assert max(attempts.values()) == 1, f"a run was attempted twice: {attempts.most_common(3)}"
        [child] = _executor_children(node.proc.pid)
        node.kill()  # SIGKILL: the node cannot stop its executor process; the kernel must

        async def gone() -> bool:
            return not _alive(child)

        await until(gone, 10, f"the executor process {child} to die with its SIGKILLed node")
    finally:
        node.stop()
