"""The ledger's fence as a test sets it up: without an election, a ticker fires under a fixed
term, and a test seeds slots under whatever term holds the fence (as its leader would)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob.store.slots import Deposed, Recorded, SlotLedger, SlotRow
from kjob.store.tables import ticker_lease


class FixedLeadership:
    """What a ticker needs of `kjob.ticker.leader.Leadership`: a term that holds for the whole
    test. `fenced_in` writes it into the ledger's fence."""

    def __init__(self, term: int, node: str = "test") -> None:
        self.term, self.node = term, node

    def valid(self) -> bool:
        return True


async def fenced_in(engine: AsyncEngine) -> FixedLeadership:
    """The term that holds the ledger's fence; a fresh ledger's is 0, which an elected leader's
    revision (1 or more) later takes over."""
    await SlotLedger(engine).take_lease(0, "test", stale_after_s=60.0)  # False: a term is there already
    async with engine.connect() as conn:
        term = (await conn.execute(select(ticker_lease.c.revision).where(ticker_lease.c.id == 1))).scalar_one()
    return FixedLeadership(term)


async def record_slots(engine: AsyncEngine, rows: Sequence[SlotRow]) -> Recorded:
    """Write slots into the ledger as the ticker that holds its fence does. A node started by
    the test may be elected meanwhile: its term then holds the fence, and the slots go under it."""
    for _ in range(2):
        try:
            return await SlotLedger(engine).record_slots(rows, fence=(await fenced_in(engine)).term)
        except Deposed:
            pass
    return await SlotLedger(engine).record_slots(rows, fence=(await fenced_in(engine)).term)
