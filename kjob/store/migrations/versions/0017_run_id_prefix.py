"""Short run ids: an index that serves `id LIKE 'prefix%'`, so a run named by the start of its
id is found without reading the whole ledger.

Revision ID: 0017
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0017"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_job_runs_id_prefix", "job_runs", ["id"], postgresql_ops={"id": "text_pattern_ops"})


def downgrade() -> None:
    op.drop_index("ix_job_runs_id_prefix", table_name="job_runs")
