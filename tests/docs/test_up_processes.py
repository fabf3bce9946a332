"""`kjob up` leaves no zombie child: the process sandbox's start-up self-test ran bwrap, whose
inner process, re-parented to `kjob up` (a child subreaper), stayed `[bwrap] <defunct>` for
the life of the node. Checked from outside, in /proc, on the real `kjob up` of this directory."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.up import Up

#: A child that just ended is a zombie until its parent reaps it: one that stays this long is left.
LINGER_S = 3.0


def zombie_children(pid: int) -> dict[int, str]:
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if rest[0] == "Z" and int(rest[1]) == pid:
            found[int(stat.parent.name)] = name
    return found


def test_kjob_up_leaves_no_zombie_child(up: Up) -> None:
    assert up.proc is not None and up.proc.poll() is None
    seen = zombie_children(up.proc.pid)
    deadline = time.monotonic() + LINGER_S
    while seen and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = {pid: name for pid, name in zombie_children(up.proc.pid).items() if pid in seen}
    assert seen == {}, f"zombie children of kjob up (pid {up.proc.pid}): {seen}"
