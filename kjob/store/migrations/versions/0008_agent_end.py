"""An attempt's agent end as its watchdog saw it, when its executor could not write it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("run_attempts", sa.Column("agent_exit_code", sa.Integer))
    op.add_column("run_attempts", sa.Column("agent_ended_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("run_attempts", "agent_ended_at")
    op.drop_column("run_attempts", "agent_exit_code")
