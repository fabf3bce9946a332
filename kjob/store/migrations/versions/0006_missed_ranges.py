"""Compact records of slots missed during a long downtime: one row per job, range and reason.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "missed_ranges",
        sa.Column("job_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("slug", sa.String(63), nullable=False),
        sa.Column("first_slot", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_slot", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("count_exact", sa.Boolean(), nullable=False, server_default=sa.text("true")),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("leader_rev", sa.BigInteger()),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_missed_ranges_job_id_jobs", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "first_slot", name="pk_missed_ranges"),
    )


def downgrade() -> None:
    op.drop_table("missed_ranges")
