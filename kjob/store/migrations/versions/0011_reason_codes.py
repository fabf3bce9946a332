"""Why a slot did not run, as a code beside the sentence: `reason_code` on `job_runs` and
`missed_ranges`, a kjob.model.run.MissReason value. Nullable: rows written before it have
only their sentence, and runs that ran have no code.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("job_runs", sa.Column("reason_code", sa.Text(), nullable=True))
    op.add_column("missed_ranges", sa.Column("reason_code", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("missed_ranges", "reason_code")
    op.drop_column("job_runs", "reason_code")
