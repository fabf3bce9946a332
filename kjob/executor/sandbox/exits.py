"""Exit statuses as words, the same for every backend."""

from __future__ import annotations

import signal


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def exit_reason(exit_code: int) -> str | None:
    """Why an exit code is what it is, when it says more than "non-zero".

    Negative codes come straight from waitpid: Python reports a death by signal n as -n.
    A shell, tini or bubblewrap in between reports it as 128+n instead; a program may also
    exit 128+n on its own, so that reason says "probably".
    """
    if exit_code < 0:
        return f"killed by {_signal_name(-exit_code)} (exit code {exit_code} = -signal)"
    if 128 < exit_code < 128 + 65:
        return f"exit code {exit_code} = 128+{exit_code - 128}: probably killed by {_signal_name(exit_code - 128)}"
    return None


def oom_reason(exit_code: int, memory: str | None) -> str:
    """The reason of an attempt in which the kernel killed a process for want of memory. The
    kill may have hit any process of the attempt: the agent itself may have survived."""
    reason = f"OOM killed (memory limit {memory})"
    if exit_code == 0:
        reason = f"a process of the agent was {reason}; the agent still exited 0"
    return reason
