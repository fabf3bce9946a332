"""Prepared work dirs of the process backend: where the executor stages a workspace clone and
$KJOB_RESULT for an attempt under bubblewrap, and reads the result back after it.

Each is a dir under STAGING_ROOT (world-traversable: the attempt's own uid must reach it) with
a tmpfs of the sandbox's disk size mounted on it where the executor may mount (root), so what
an agent writes there is bounded and never reaches the host's disk.

Mounting and unmounting a tmpfs per attempt, and the trips to a worker thread that the unmount
needs (it sleeps in the kernel for most of a millisecond), cost the executor about 1.4 ms of
CPU per run at 100 runs/s. So the dirs are pooled: an attempt's dir whose agent left a small
tree is emptied on the spot, without following any link the agent made, and serves the next
attempt; one that holds more than that is unmounted and removed in a worker thread, as before,
and never reused. Every process of the attempt is gone by then (its process group and its pid
namespace ended), so nothing of it can write there any more.

A dir's name holds the pid of the executor that made it, so one that outlived its executor
(SIGKILLed, or a sandbox never closed) is reclaimed by the next sandbox that starts here
(`sweep`), and a live executor's dirs are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

#: Where prepared work dirs are staged: world-traversable.
STAGING_ROOT = "/var/tmp"
#: An attempt's dir is emptied on the spot and reused only if it holds at most this many
#: entries (the result file and a private HOME are four); a bigger tree goes to a thread.
REUSE_MAX_ENTRIES = 16
#: A staged dir's name: this, the pid of the executor that made it, "-", a random part.
PREFIX = "kjob-work-"
#: Owner-only, as a fresh tmpfs is.
_MODE = 0o700
#: umount2(2) flag: detach now, free once no process uses it.
MNT_DETACH = 2
_LIBC = ctypes.CDLL(None, use_errno=True)


class StagingPool:
    """Prepared work dirs, each a tmpfs of `size_bytes` where the executor may mount one."""

    def __init__(self, size_bytes: int, root: str = STAGING_ROOT) -> None:
        self.size_bytes, self.root = size_bytes, root
        self._free: list[Path] = []

    def take(self) -> Path:
        """An empty dir of ours (mode 0700) for one attempt."""
        if self._free:
            return self._free.pop()
        path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=self.root))
        _mount_tmpfs(path, self.size_bytes)
        return path

    def give(self, path: Path) -> bool:
        """Take an attempt's dir back: True if it was emptied here and is pooled again; False
        if it holds more than a few entries (the caller then removes it with `remove`)."""
        if not _clear_small_tree(path, REUSE_MAX_ENTRIES):
            return False
        # The agent owned it (a uid of its own) and may have changed its mode.
        os.chown(path, os.geteuid(), os.getegid())
        os.chmod(path, _MODE)
        self._free.append(path)
        return True

    def close(self) -> None:
        """Unmount and remove the pooled dirs."""
        free, self._free = self._free, []
        for path in free:
            remove(path)


def sweep(root: str = STAGING_ROOT) -> int:
    """Unmount and remove the staged dirs under `root` whose executor is gone; how many."""
    swept = 0
    with os.scandir(root) as it:
        owned = [(e.path, _owner(e.name)) for e in it if e.name.startswith(PREFIX)]
    for path, pid in owned:
        if pid is None or _alive(pid):
            continue
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
            remove(Path(path))
        except OSError as e:  # another sandbox's sweep got there first, or we may not
            log.debug("process sandbox: left staged dir %s (%s)", path, e)
            continue
        swept += not os.path.lexists(path)
    if swept:
        log.info("process sandbox: removed %d staged work dirs of executors that are gone", swept)
    return swept


def _owner(name: str) -> int | None:
    pid, _, rest = name[len(PREFIX):].partition("-")
    return int(pid) if pid.isdigit() and rest else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove(path: Path) -> None:
    """Unmount a staged dir's tmpfs and remove the dir: a walk only where no tmpfs held it."""
    if os.path.ismount(path):
        _LIBC.umount2(os.fsencode(path), MNT_DETACH)
    remove_dir(path)


def remove_dir(path: Path) -> None:
    if not removed_if_empty(path):  # not empty: no tmpfs could be mounted, or bwrap could not be used
        shutil.rmtree(path, True)


def removed_if_empty(path: Path) -> bool:
    """Remove `path` if it is an empty dir; True if it is gone (or never was)."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def chown_tree(root: Path, uid: int) -> None:
    for dirpath, dirs, files in os.walk(root):
        for name in (dirpath, *(os.path.join(dirpath, n) for n in dirs + files)):
            os.chown(name, uid, uid, follow_symlinks=False)


def chown_small_tree(root: Path, uid: int, limit: int = REUSE_MAX_ENTRIES) -> bool:
    """`chown_tree` for a tree of at most `limit` entries, from one scan; False (nothing
    changed) for a bigger one, which the caller hands to a thread."""
    entries = _entries(root, limit)
    if entries is None:
        return False
    for name in (str(root), *(path for path, _ in entries)):
        os.chown(name, uid, uid, follow_symlinks=False)
    return True


def _mount_tmpfs(path: Path, size_bytes: int) -> bool:
    """Mount a tmpfs of `size_bytes` on `path` (mount(2)); False where we may not mount."""
    options = f"size={size_bytes},mode={_MODE:o}".encode()
    if _LIBC.mount(b"tmpfs", os.fsencode(path), b"tmpfs", 0, options) == 0:
        return True
    log.debug("process sandbox: no tmpfs for %s (%s); the staged work dir is not size-bounded",
              path, os.strerror(ctypes.get_errno()))
    return False


def _entries(root: Path, limit: int) -> list[tuple[str, bool]] | None:
    """(path, is a real dir) of everything under `root`, parents first; None past `limit`."""
    found: list[tuple[str, bool]] = []
    pending = [str(root)]
    while pending:
        with os.scandir(pending.pop()) as it:
            for entry in it:
                found.append((entry.path, entry.is_dir(follow_symlinks=False)))
                if len(found) > limit:
                    return None
                if found[-1][1]:
                    pending.append(entry.path)
    return found


def _clear_small_tree(root: Path, limit: int) -> bool:
    """Empty `root` if it holds at most `limit` entries; False (and nothing removed) if more.
    Links are removed, never followed: the agent made them, and may aim them at the host."""
    try:
        entries = _entries(root, limit)
        if entries is None:
            return False
        for path, is_dir in reversed(entries):  # children before their parents
            if is_dir:
                os.rmdir(path)
            else:
                os.unlink(path)
        return stat.S_ISDIR(os.lstat(root).st_mode)
    except OSError as e:  # the agent left something we cannot remove here: drop the dir
        log.debug("process sandbox: staged dir %s not reused (%s)", root, e)
        return False
