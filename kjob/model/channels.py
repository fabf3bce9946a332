"""Which result channels a job may name: `none`, or `<kind>:<address>` of a kind Relay knows.

Relay delivers to the kinds RFC section 7 lists (Kode chat, Slack, Telegram, email, webhook);
the operator may change the list (`relay_channel_kinds`) when their Relay knows others. A
channel of an unknown kind is refused when the job is written, not at its first run. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence

from kjob.errors import InvalidInput

#: RFC section 7's kinds, as channel prefixes (`kode-chat:team-app`, `webhook:https://...`).
DEFAULT_CHANNEL_KINDS: tuple[str, ...] = ("kode-chat", "slack", "telegram", "email", "webhook")
KIND_PATTERN = r"^[a-z0-9][a-z0-9-]{0,31}$"
FIELD = "output.channel"


def check_channel_kind(channel: str, kinds: Sequence[str]) -> None:
    """Raise InvalidInput (field `output.channel`) unless `channel` is `none` or
    `<kind>:<address>` with a kind of `kinds` and an address."""
    if channel == "none":
        return
    known = ", ".join(kinds)
    kind, sep, address = channel.partition(":")
    if not sep or not address.strip():
        raise InvalidInput(f"{channel!r} is not a channel: write KIND:ADDRESS, e.g. 'kode-chat:team-app' "
                           f"(kinds: {known}), or 'none'", FIELD)
    if kind not in kinds:
        raise InvalidInput(f"{kind!r} is not a channel kind; the kinds are {known} "
                           "(the operator's relay_channel_kinds)", FIELD)
