"""Whether a finished run's answer is sent to its channel (`output.notify`, `output.quiet`). Pure.

    always       every finished run
    on_failure   runs that did not succeed
    on_change    runs whose answer differs from the last one sent (compared normalized:
                 whitespace runs collapsed, case kept), and every failure
    never        none

Whatever the policy, an answer that is exactly the quiet marker (default `NO_REPLY`, compared
after trimming) is not sent, and the agent's own `notify` in its result file overrides the
policy. A run not sent keeps its reason in the ledger (`delivery_status = suppressed`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_SPACE = re.compile(r"\s+")


def normalize(answer: str) -> str:
    return _SPACE.sub(" ", answer).strip()


def answer_hash(answer: str) -> str:
    return hashlib.sha256(normalize(answer).encode()).hexdigest()


@dataclass(frozen=True)
class Decision:
    send: bool
    reason: str | None = None  #: why it is not sent


def decide(
    *,
    policy: str,
    quiet: str,
    succeeded: bool,
    answer: str,
    agent_notify: bool | None,
    last_sent_hash: str | None,
    last_sent_run: str | None = None,
) -> Decision:
    if quiet and answer.strip() == quiet.strip():
        return Decision(False, f"the answer is the quiet marker {quiet!r}")
    if agent_notify is False:
        return Decision(False, "the agent asked not to notify (notify = false in its result file)")
    if agent_notify is True:
        return Decision(True)
    if policy == "never":
        return Decision(False, "notify = never")
    if policy == "on_failure" and succeeded:
        return Decision(False, "notify = on_failure and the run succeeded")
    if policy == "on_change" and succeeded and last_sent_hash == answer_hash(answer):
        return Decision(False, f"notify = on_change and the answer is unchanged since run {last_sent_run}")
    return Decision(True)
