"""Memory cgroups for the process backend: a real bound on an attempt's memory (resident, its
tmpfs pages included), where this node lets the executor make them.

Made under the executor's own cgroup of the v1 `memory` hierarchy, when it is writable (as on
hosts that mount cgroup v1, or hybrid). A unified (v2) hierarchy is not used: its "no
processes in inner cgroups" rule means the executor would first have to move itself into a
leaf of a delegated subtree; see docs/sandboxes.md. Where there is no writable hierarchy,
`sandbox.memory` stays an address-space rlimit.

The attempt's first host-side program joins the cgroup itself (`echo $$ > cgroup.procs`, then
exec), so no process of the attempt ever runs outside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)


class MemoryCgroups:
    """Creates one memory cgroup per attempt under `base` (the executor's own v1 cgroup)."""

    def __init__(self, base: Path) -> None:
        self.base = base

    @classmethod
    def find(cls) -> MemoryCgroups | None:
        """The executor's own v1 memory cgroup if a child of it can be made and limited here."""
        base = _own_v1_memory_cgroup()
        if base is None:
            return None
        probe = cls(base)
        try:
            path = probe.create(f"probe-{os.getpid()}", 64 * 1024**2)
        except OSError as e:
            log.info("process sandbox: no memory cgroups (%s): sandbox.memory is an address-space limit", e)
            return None
        probe.remove(path)
        return probe

    def create(self, name: str, limit_bytes: int) -> Path:
        path = self.base / f"kjob-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()  # a leftover of a crash, empty since its processes are gone
        path.mkdir()
        try:
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            with contextlib.suppress(OSError):  # without swap accounting there is no memsw file
                (path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
        except OSError:
            self.remove(path)
            raise
        return path

    @staticmethod
    def oom_kills(path: Path) -> int:
        """How many processes the kernel killed in the cgroup for want of memory."""
        try:
            fields = dict(line.split() for line in (path / "memory.oom_control").read_text().splitlines())
        except (OSError, ValueError):
            return 0
        return int(fields.get("oom_kill", 0))

    @staticmethod
    def remove(path: Path) -> None:
        """Remove the (empty) cgroup; a failure is logged, the next attempt's create replaces it."""
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("process sandbox: could not remove cgroup %s (%s)", path, e)


def joining_argv(path: Path) -> list[str]:
    """argv prefix: a shell that moves itself into the cgroup, then execs the rest."""
    return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(path)]


def _own_v1_memory_cgroup() -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    own = next((parts[2] for parts in (line.split(":", 2) for line in lines)
                if len(parts) == 3 and "memory" in parts[1].split(",")), None)
    if own is None:
        return None
    for line in mounts:
        fields = line.split()
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""
        if fstype == "cgroup" and "memory" in options.split(","):
            root, point = fields[3], fields[4]
            relative = os.path.relpath(own, root) if own != root else ""
            path = Path(point) / relative if relative not in ("", ".") else Path(point)
            return path if path.is_dir() else None
    return None
