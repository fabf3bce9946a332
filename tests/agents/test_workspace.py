"""The workspace clone on its own (real git, a local bare repository): the cap and the ref."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import datetime, timezone
from uuid import uuid4

import pytest

from kjob.executor.agent_run import AgentRun, WorkspaceError
from kjob.executor.agents import SHELL
from kjob.model.job import Job


def _repo(tmp_path, size: int):
    bare, src = tmp_path / "r.git", tmp_path / "src"
    run = lambda *a, cwd=None: subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a],  # noqa: E731
                                              cwd=cwd, check=True, capture_output=True)
    run("init", "--bare", "-b", "main", str(bare))
    run("clone", str(bare), str(src))
    (src / "blob").write_bytes(os.urandom(size))  # random: compression cannot hide it
    run("add", "blob", cwd=src)
    run("commit", "-m", "x", cwd=src)
    run("push", "origin", "main", cwd=src)
    return bare


def _agent_run(tmp_path, git: str, ref: str = "main", max_bytes: int = 10**9) -> AgentRun:
    now = datetime.now(timezone.utc)
    job = Job(id=uuid4(), tenant="t", created_at=now, updated_at=now, slug="w", prompt="true", agent="shell",
              schedule="@every 1h", workspace={"git": git, "ref": ref})
    return AgentRun(SHELL, job, stdout_cap=1000, clone_timeout_s=30, clone_max_bytes=max_bytes,
                    local_roots=[tmp_path])


async def test_a_clone_over_the_cap_fails_and_one_under_it_holds_the_files(tmp_path):
    bare = _repo(tmp_path, 300_000)
    (tmp_path / "big").mkdir()
    with pytest.raises(WorkspaceError, match="over the 100000 byte cap"):
        await _agent_run(tmp_path, str(bare), max_bytes=100_000).prepare(tmp_path / "big")
    (tmp_path / "ok").mkdir()
    env = await _agent_run(tmp_path, f"file://{bare}").prepare(tmp_path / "ok")
    assert (tmp_path / "ok" / "blob").stat().st_size == 300_000
    assert env["KJOB_RESULT"].startswith(str(tmp_path / "ok" / ".kjob"))
    status = subprocess.run(["git", "status", "--porcelain"], cwd=tmp_path / "ok", capture_output=True, text=True)
    assert status.stdout == ""  # .kjob/ is not the agent's change


async def test_an_unknown_ref_fails_with_gits_reason(tmp_path):
    bare = _repo(tmp_path, 10)
    (tmp_path / "w").mkdir()
    with pytest.raises(WorkspaceError, match="ref nope"):
        await _agent_run(tmp_path, str(bare), ref="nope").prepare(tmp_path / "w")


async def test_the_result_file_is_never_read_through_a_symlink(tmp_path):
    # the agent owns its work dir: a link to a host file (the kjob home's secret key) must not
    # become the Relay body, whether the file or its directory is the link
    secret = tmp_path / "elsewhere" / "result.json"
    secret.parent.mkdir()
    secret.write_text('{"body": "the node secret"}')

    def link_file(work):
        (work / ".kjob" / "result.json").symlink_to(secret)

    def link_dir(work):
        shutil.rmtree(work / ".kjob")
        (work / ".kjob").symlink_to(secret.parent)

    for plant in (link_file, link_dir):
        work = tmp_path / plant.__name__
        work.mkdir()
        agent_run = _agent_run(tmp_path, "https://git.example/r.git")
        agent_run.job = agent_run.job.model_copy(update={"workspace": None})
        await agent_run.prepare(work)
        plant(work)
        await agent_run.collect(work)
        assert agent_run.report().answer is None
        assert "could not be read" in (agent_run.result_error or "")
