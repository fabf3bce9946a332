"""Security: encrypted tenant secrets, and an index to count a tenant's running runs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-05-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "tenant_secrets",
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("ciphertext", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=NOW),
        sa.Column("updated_at", TS, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("tenant", "name", name="pk_tenant_secrets"),
    )
    # The executor counts a tenant's running runs at every claim when the tenant has a
    # concurrency quota: this keeps that count to the few rows that are running.
    op.create_index(
        "ix_job_runs_tenant_running",
        "job_runs",
        ["tenant"],
        postgresql_where=sa.text("status = 'running'"),
    )


def downgrade() -> None:
    op.drop_index("ix_job_runs_tenant_running", table_name="job_runs")
    op.drop_table("tenant_secrets")
