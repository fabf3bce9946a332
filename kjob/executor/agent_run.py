"""One attempt as the agent sees it: its workspace, its result file, its stream and its budget.

The executor hands an AgentRun the attempt's live output (already masked of secrets). The
AgentRun feeds the adapter's Stream line by line and, when the job's limits are passed on
what the stream shows, sets `exceeded`: the executor then stops the sandbox. In the process
backend it also prepares the work dir before the agent starts (a fresh clone of the job's
workspace; $KJOB_RESULT and a private HOME under `.kjob/`) and reads the result file back
before the work dir is removed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Sequence

from kjob.executor.agents import Agent
from kjob.model.agent_report import AgentReport, BadResult, parse_result_file
from kjob.model.job import Job

#: Under the work dir, kept out of a workspace clone's `git status`.
KJOB_DIR = ".kjob"
RESULT_FILE = "result.json"
#: Each stream's partial last line is held up to this; a longer line is read as it is.
MAX_LINE_CHARS = 1024 * 1024


class WorkspaceError(Exception):
    """The workspace could not be cloned; the message says why (the attempt ends `error`)."""


class AgentRun:
    def __init__(self, agent: Agent, job: Job, *, stdout_cap: int, clone_timeout_s: float,
                 clone_max_bytes: int, local_roots: Sequence[Path]) -> None:
        self.agent, self.job = agent, job
        self.stream = agent.reader.stream(agent.endpoint)
        self.exceeded = asyncio.Event()
        self.budget_reason: str | None = None
        self.result_error: str | None = None
        self._result_raw: bytes | None = None
        self._partial = {"stdout": "", "stderr": ""}
        self._stdout: list[str] = []
        self._all: list[str] = []  #: both streams, for the log of an attempt kjob stopped itself
        self._all_chars = 0
        self._stdout_chars = 0
        self._stdout_cap = stdout_cap
        self._clone_timeout_s, self._clone_max_bytes = clone_timeout_s, clone_max_bytes
        self._local_roots = [Path(p).resolve() for p in local_roots]

    # -- output --------------------------------------------------------------------------

    def feed(self, stream: str, text: str) -> None:
        if self._all_chars < self._stdout_cap:
            self._all.append(text[: self._stdout_cap - self._all_chars])
            self._all_chars += len(self._all[-1])
        if stream == "stdout" and self._stdout_chars < self._stdout_cap:
            self._stdout.append(text[: self._stdout_cap - self._stdout_chars])
            self._stdout_chars += len(self._stdout[-1])
        if stream not in self._partial:
            return
        buffered = self._partial[stream] + text
        *lines, rest = buffered.split("\n")
        if len(rest) > MAX_LINE_CHARS:
            lines, rest = [*lines, rest], ""
        self._partial[stream] = rest
        for line in lines:
            self.stream.line(line, stream)
        self._check_budget()

    def _check_budget(self) -> None:
        if self.exceeded.is_set():
            return
        limits = self.job.limits
        # Strictly over: an agent that enforces the limit itself (claude's --max-turns) stops at
        # it and reports so; kjob only steps in for agents that do not.
        if limits.max_turns is not None and self.stream.turns > limits.max_turns:
            self.budget_reason = f"stopped after {self.stream.turns} turns: over max_turns {limits.max_turns}"
        elif (limits.max_cost_usd is not None and self.stream.cost_usd is not None
              and self.stream.cost_usd > limits.max_cost_usd):
            self.budget_reason = f"cost ${self.stream.cost_usd:.4f}: over max_cost_usd {limits.max_cost_usd}"
        if self.budget_reason:
            self.exceeded.set()

    def output(self) -> str:
        """What the agent printed so far (both streams, masked, up to the cap)."""
        return "".join(self._all)

    def report(self) -> AgentReport:
        """The adapter's report, the result file over it, priced from tokens if need be."""
        for stream, rest in self._partial.items():
            if rest:
                self.stream.line(rest, stream)
                self._partial[stream] = ""
        report = self.stream.report("".join(self._stdout))
        if self._result_raw is not None:
            try:
                report = report.merged(parse_result_file(self._result_raw))
            except BadResult as e:
                self.result_error = f"$KJOB_RESULT ignored: {e}"
        return report.priced(self.agent.price)

    # -- the work dir (process backend) --------------------------------------------------

    async def prepare(self, workdir: Path) -> dict[str, str]:
        """Clone the workspace into `workdir`; the environment that points into it.

        :raises WorkspaceError: the clone failed, timed out or was too large.
        """
        if self.job.workspace is not None:
            await self._clone(workdir)
        private = workdir / KJOB_DIR
        (private / "home").mkdir(parents=True, exist_ok=True)
        exclude = workdir / ".git" / "info" / "exclude"
        if exclude.parent.is_dir():
            with exclude.open("a") as f:
                f.write(f"\n/{KJOB_DIR}/\n")
        return {"KJOB_RESULT": str(private / RESULT_FILE), "HOME": str(private / "home")}

    async def collect(self, workdir: Path) -> None:
        try:
            self._result_raw = _read_own_file(workdir, KJOB_DIR, RESULT_FILE, 256 * 1024 + 1)
        except FileNotFoundError:
            return
        except OSError as e:
            self.result_error = f"$KJOB_RESULT could not be read: {e.strerror or e}"

    async def _clone(self, workdir: Path) -> None:
        spec = self.job.workspace
        assert spec is not None
        source = spec.git
        local = source.startswith(("/", "file://"))
        if local:
            path = Path(source.removeprefix("file://")).resolve()
            if not any(path == root or root in path.parents for root in self._local_roots):
                raise WorkspaceError(
                    f"workspace {source!r} is a local path outside executor.workspace_roots; "
                    "use a git URL or ask the operator to allow that directory")
            source = f"file://{path}"  # so --depth is honoured and no object is hard-linked
        with tempfile.TemporaryDirectory(prefix="kjob-git-") as home:
            env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": home, "GIT_TERMINAL_PROMPT": "0",
                   "GIT_CONFIG_NOSYSTEM": "1", "GIT_ASKPASS": "/bin/false", "LANG": "C",
                   # the clone runs on the host: no `ext::` or other transport that runs commands
                   "GIT_ALLOW_PROTOCOL": "https:http:ssh:git:file"}
            git = shutil.which("git", path=env["PATH"])
            if git is None:
                raise WorkspaceError("git is not installed on this node; the workspace cannot be cloned")
            proc = await asyncio.create_subprocess_exec(
                git, "-c", "protocol.file.allow=always", "clone", "--quiet", "--depth", "1", "--single-branch",
                "--no-tags", "--branch", spec.ref, "--", source, str(workdir),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env=env, start_new_session=True,
            )
            watcher = asyncio.create_task(self._watch_size(workdir, proc))
            try:
                async with asyncio.timeout(self._clone_timeout_s):
                    out, _ = await proc.communicate()
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise WorkspaceError(f"cloning {spec.git} took longer than {self._clone_timeout_s:g} s") from None
            finally:
                watcher.cancel()
            if watcher.done() and not watcher.cancelled() and watcher.result():
                raise WorkspaceError(f"the clone of {spec.git} is over the {self._clone_max_bytes} byte cap")
            if proc.returncode != 0:
                raise WorkspaceError(f"git clone {spec.git} (ref {spec.ref}) failed: "
                                     f"{out.decode(errors='replace').strip()[-500:]}")
        if _size(workdir) > self._clone_max_bytes:
            raise WorkspaceError(f"the clone of {spec.git} is over the {self._clone_max_bytes} byte cap")

    async def _watch_size(self, workdir: Path, proc: asyncio.subprocess.Process) -> bool:
        """Kill the clone as soon as it grows past the cap; True if it did."""
        while proc.returncode is None:
            await asyncio.sleep(0.2)
            if await asyncio.to_thread(_size, workdir) > self._clone_max_bytes:
                proc.kill()
                return True
        return False


def _read_own_file(workdir: Path, directory: str, name: str, limit: int) -> bytes | None:
    """Up to `limit` bytes of `workdir/directory/name`, never through a symlink: the agent owns
    the work dir, and the executor reading a link to the kjob home would hand its secrets to
    the agent's Relay body. Anything but a regular file is refused."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    dir_fd = os.open(workdir, flags | os.O_DIRECTORY)
    try:
        sub_fd = os.open(directory, flags | os.O_DIRECTORY, dir_fd=dir_fd)
        try:
            fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=sub_fd)
        finally:
            os.close(sub_fd)
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{directory}/{name} is not a regular file")
        return f.read(limit)


def _size(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total
