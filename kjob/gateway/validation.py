"""The checks of invariant 4 that need the node: run before every write, so a refused job
changes nothing. (The checks that need nothing, slug, prompt, durations, cron syntax, zone,
live in `kjob.model.job.JobSpec` and have already run when a JobSpec exists.)"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from kjob.dispatcher.relay import WEBHOOK_PREFIX, channel_kind
from kjob.dispatcher.targets import check_target_at_create
from kjob.errors import InvalidInput
from kjob.executor.agents import AgentRegistry
from kjob.model.channels import DEFAULT_CHANNEL_KINDS, check_channel_kind
from kjob.model.job import JobSpec, Timing
from kjob.model.targets import AllowList
from kjob.model.text import find_bad_text
from kjob.model.schedule import Schedule


def check_job(
    spec: JobSpec,
    *,
    agents: AgentRegistry,
    relay_configured: bool,
    now: datetime,
    previous: JobSpec | Timing | None = None,
    text_checked: bool = False,
    channel_kinds: Sequence[str] = DEFAULT_CHANNEL_KINDS,
) -> None:
    """Raise InvalidInput (naming the field) unless this node can run and deliver `spec`.

    `previous` is the stored version when this is an update. A schedule that can never fire
    again (a `@once` in the past) is refused only when the schedule or zone is new or changed:
    a one-shot job that already fired can still be edited, disabled or re-applied unchanged.

    :raises InvalidInput: field `agent` (unknown agent), `output.channel` (a channel this node
        cannot deliver to, or of a kind not in `channel_kinds`), `schedule` (no future slot), or any text field holding a NUL
        character (PostgreSQL cannot store one).
    """
    if not text_checked:  # else the caller checked the request's text as a whole
        check_storable(spec.model_dump(mode="json"), "")
    agents.get(spec.agent)
    check_channel_kind(spec.output.channel, channel_kinds)
    channel_kind(spec.output.channel, relay_configured)
    timing_changed = previous is None or (previous.schedule, previous.timezone) != (spec.schedule, spec.timezone)
    if timing_changed:
        Schedule.parse(spec.schedule).check_future(now)


async def check_target(spec: JobSpec, allow: AllowList) -> None:
    """Refuse a webhook to the node's own or private addresses (kjob.model.targets), checked on
    what its host resolves to now; the dispatcher checks again at every connect.

    Also with a Relay configured, which then delivers webhooks: it may sit on the same network.

    :raises InvalidInput: field `output.channel`.
    """
    if spec.output.channel.startswith(WEBHOOK_PREFIX):
        await check_target_at_create(spec.output.channel[len(WEBHOOK_PREFIX):], allow)


def check_storable(value: Any, path: str) -> None:
    """Refuse NUL characters and lone surrogates anywhere in `value`: PostgreSQL text and JSONB
    cannot hold them, and the store would fail with a server error instead of naming the field."""
    found = find_bad_text(value, path)
    if found:
        field, problem = found
        raise InvalidInput(problem, field)
