"""The host's clock, as the one aware UTC datetime every module reads.

One definition, so a test can tell the modules that read the host's clock from the ones that
read the database's (the ticker, claims), and a module-level name a test may replace."""

from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
