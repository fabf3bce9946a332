"""Schedules and slot maths. Pure. (Being written: see the interface below.)"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Iterator


@dataclass(frozen=True)
class Schedule:
    expr: str

    @classmethod
    def parse(cls, expr: str) -> "Schedule":
        return cls(expr.strip())

    def slots(self, after: datetime, tz: str = "UTC") -> Iterator[datetime]:
        raise NotImplementedError

    def next_slot(self, after: datetime, tz: str = "UTC") -> datetime | None:
        return next(iter(self.slots(after, tz)), None)
