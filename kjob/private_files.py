"""Files only their owner may read: tokens, keys, passwords kept under KJOB_HOME."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600, atomically.

    Written beside it and renamed: a reader never sees half a file, nor a file readable by
    others (not even for an instant, as `write_text` then `chmod` would allow).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)  # O_CREAT keeps the mode of a file left by a crash
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
