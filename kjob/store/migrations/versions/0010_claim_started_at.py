"""A claim's `started_at` is the moment of the claim (clock_timestamp(), after the job lock and
the busy check), not its transaction's start: `kjob_claim_first` again, with that change.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

from kjob.store.tables import CLAIM_FIRST_FUNCTION

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(CLAIM_FIRST_FUNCTION)


def downgrade() -> None:
    pass  # the 0009 function differs only in the time it stamps
