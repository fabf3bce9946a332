"""The common claim in one round trip: `kjob_claim_first(run, executor, lease)`.

A run's first attempt, of an enabled job whose overlap policy is `skip` (but for a backfill or
catch-up slot, which `skip` queues: kjob.store.overlap.effective_policy) or `allow`, with no
other run of the job busy, is claimed by this function in one statement, without a transaction
of its own around it (kjob.store.claims.ClaimLedger.claim). It takes the job lock first; each
statement after it takes a fresh snapshot (READ COMMITTED, a VOLATILE function), so it sees
every claim of the job that held the lock before: as the claim transaction does. Whatever else
(a retry, a lapsed claim, a disabled job, `queue` or `replace`, a busy job) it leaves alone and
answers `slow`: the claim transaction decides. The job lock and the busy test are those of
kjob.store.overlap (`job_lock_sql`, `BUSY_SQL`).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

from kjob.store.tables import CLAIM_FIRST_FUNCTION

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None



def upgrade() -> None:
    op.execute(CLAIM_FIRST_FUNCTION)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS kjob_claim_first(text, text, float8)")
