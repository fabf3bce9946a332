"""What the run ledger's roles share: a `job_runs` row as a `Run`, and the status sets their
statements test for. The roles themselves: `slots` (ticker, recovery, run-now, backfill),
`claims` (executor), `deliveries` (dispatcher), `runs` (the API's reads)."""

from __future__ import annotations

from sqlalchemy import Row

from kjob.model.run import FINAL_STATUSES, Run

#: The final statuses as stored: a run in one of them has ended and may have a result to deliver.
FINAL_VALUES = tuple(s.value for s in FINAL_STATUSES)


def run_of(row: Row) -> Run:
    """A `job_runs` row read through SQLAlchemy as a Run."""
    return Run.model_validate(dict(row._mapping))
