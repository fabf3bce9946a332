"""The statements a node sends at once, in one statement each batch (kjob.store._batch):
`kjob_claim_many(runs, executor, lease)`, `kjob_claim_first` for each run, job by job, and
`kjob_finish_many(ends)`, the ends of attempts (kjob.store.tables).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

from kjob.store.tables import CLAIM_MANY_FUNCTION, FINISH_MANY_FUNCTION

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(CLAIM_MANY_FUNCTION)
    op.execute(FINISH_MANY_FUNCTION)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS kjob_finish_many(jsonb)")
    op.execute("DROP FUNCTION IF EXISTS kjob_claim_many(text[], text, float8)")
