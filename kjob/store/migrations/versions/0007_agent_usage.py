"""Agent usage and answers per attempt: tokens, cost, turns, model, and the answer Relay gets.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_usage",
        sa.Column("run_id", sa.String(64), sa.ForeignKey("job_runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("job_id", sa.dialects.postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("model", sa.String(200)),
        sa.Column("tokens_in", sa.BigInteger),
        sa.Column("tokens_out", sa.BigInteger),
        sa.Column("cost_usd", sa.Float),
        sa.Column("turns", sa.Integer),
        sa.Column("answer", sa.Text),
        sa.Column("answer_hash", sa.String(64)),
        sa.Column("summary", sa.Text),
        sa.Column("notify", sa.Boolean),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("run_id", "attempt", name="pk_run_usage"),
    )
    op.create_index("ix_run_usage_tenant_recorded_at", "run_usage", ["tenant", "recorded_at"])
    op.create_index("ix_run_usage_job_recorded_at", "run_usage", ["job_id", "recorded_at"])


def downgrade() -> None:
    op.drop_table("run_usage")
