"""Which events become signals, and that a signal carries names and states only."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from kjob.bus.messages import Event
from kjob.dbus.signals import signal_for

AT = datetime(2026, 12, 1, tzinfo=timezone.utc)


def test_run_finished_and_job_changed_become_signals_with_names_and_states_only() -> None:
    finished = Event(kind="run_finished", tenant="acme", slug="audit", run_id="r-1", detail="failed", at=AT)
    spec = signal_for(finished)
    assert spec is not None and (spec.member, spec.signature, spec.body) == (
        "RunFinished", "ssss", ["acme", "audit", "r-1", "failed"])
    changed = Event(kind="job_changed", tenant="acme", slug="audit", detail="deleted", at=AT)
    spec = signal_for(changed)
    assert spec is not None and (spec.member, spec.body) == ("JobChanged", ["acme", "audit", "deleted"])


def test_other_events_make_no_signal() -> None:
    for kind in ("run_started", "run_dispatched"):
        assert signal_for(Event(kind=kind, tenant="acme", slug="audit", run_id="r-1", detail="1", at=AT)) is None


def test_an_event_of_a_kind_this_node_does_not_know_is_refused_at_decode() -> None:
    """A newer node's kind is not an Event here: the bridge logs it and goes on (service.py)."""
    raw = Event(kind="run_started", tenant="acme", at=AT).encode().replace(b"run_started", b"something_new")
    with pytest.raises(ValidationError):
        Event.decode(raw)


def test_a_job_changed_without_a_slug_still_has_the_signature() -> None:
    spec = signal_for(Event(kind="job_changed", tenant="acme", at=AT))
    assert spec is not None and spec.body == ["acme", "", ""]
