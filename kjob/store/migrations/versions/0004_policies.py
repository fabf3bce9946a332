"""Schedule policies: when a job was paused, a run's own overlap policy (backfill), and the
index the overlap check reads at every claim.

Revision ID: 0004
Revises: 0003
Create Date: 2026-05-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("paused_at", sa.DateTime(timezone=True)))
    # Jobs paused before this revision: their last change is the best guess of when.
    op.execute("UPDATE jobs SET paused_at = updated_at WHERE NOT enabled")
    op.add_column("job_runs", sa.Column("overlap", sa.String(16)))
    op.create_index(
        "ix_job_runs_busy",
        "job_runs",
        ["job_id", "slot"],
        postgresql_where=sa.text("status IN ('scheduled','running','retrying') OR claimed_by IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_job_runs_busy", table_name="job_runs")
    op.drop_column("job_runs", "overlap")
    op.drop_column("jobs", "paused_at")
