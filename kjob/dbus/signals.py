"""What a kjob event becomes on D-Bus: which signal, and the little it may carry.

Signals go only to peers subscribed with a token of the event's tenant (kjob.dbus.service), but
a bus monitor (root on the system bus, the same user on a session bus) sees every message, so a
signal carries names and states only: never a prompt, output, error text or note.
"""

from __future__ import annotations

from dataclasses import dataclass

from kjob.bus.messages import Event

#: The event kinds that become signals (NATS `kjob.event.<tenant>.<kind>`).
KINDS = ("run_finished", "job_changed")


@dataclass(frozen=True)
class SignalSpec:
    member: str
    signature: str
    body: list[str]


def signal_for(event: Event) -> SignalSpec | None:
    """The signal for `event`, or None for events that make none."""
    slug, detail = event.slug or "", event.detail or ""
    if event.kind == "run_finished":
        return SignalSpec("RunFinished", "ssss", [event.tenant, slug, event.run_id or "", detail])
    if event.kind == "job_changed":
        return SignalSpec("JobChanged", "sss", [event.tenant, slug, detail])
    return None
