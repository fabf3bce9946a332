"""The first schema: jobs, the run ledger, attempts, logs, dispatch targets, audit, API tokens.

Written out by hand (not imported from `kjob.store.tables`), so this migration keeps creating
the same schema after the tables change; a test checks it matches `tables.metadata`.

Revision ID: 0001
Revises:
Create Date: 2026-05-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", UUID(as_uuid=True), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("slug", sa.String(63), nullable=False),
        sa.Column("spec", JSONB, nullable=False),
        sa.Column("schedule", sa.Text, nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("enabled_at", TS),
        sa.Column("paused_note", sa.Text),
        sa.Column("version", sa.Integer, nullable=False, server_default=sa.text("1")),
        sa.Column("created_at", TS, nullable=False, server_default=NOW),
        sa.Column("updated_at", TS, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("tenant", "slug", name="uq_jobs_tenant_slug"),
    )

    op.create_table(
        "job_runs",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("job_id", UUID(as_uuid=True), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("slug", sa.String(63), nullable=False),
        sa.Column("slot", TS, nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("attempt", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("lost_attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("claimed_by", sa.String(128)),
        sa.Column("claim_until", TS),
        sa.Column("next_attempt_at", TS),
        sa.Column("created_at", TS, nullable=False, server_default=NOW),
        sa.Column("published_at", TS),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("exit_code", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("output_excerpt", sa.Text),
        sa.Column("output_bytes", sa.BigInteger),
        sa.Column("leader_rev", sa.BigInteger),
        sa.Column("delivery_status", sa.String(16), nullable=False, server_default=sa.text("'pending'")),
        sa.Column("delivery_attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("delivery_error", sa.Text),
        sa.Column("delivered_at", TS),
        sa.PrimaryKeyConstraint("id", name="pk_job_runs"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_job_runs_job_id_jobs", ondelete="CASCADE"),
        sa.UniqueConstraint("job_id", "slot", name="uq_job_runs_job_slot"),
    )
    op.create_index("ix_job_runs_job_slot_desc", "job_runs", ["job_id", sa.text("slot DESC")])
    op.create_index(
        "ix_job_runs_open",
        "job_runs",
        ["status"],
        postgresql_where=sa.text("status IN ('scheduled','running','retrying')"),
    )

    op.create_table(
        "run_attempts",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("executor", sa.String(128)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS),
        sa.Column("exit_code", sa.Integer),
        sa.Column("reason", sa.Text),
        sa.PrimaryKeyConstraint("run_id", "attempt", name="pk_run_attempts"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["job_runs.id"], name="fk_run_attempts_run_id_job_runs", ondelete="CASCADE"
        ),
    )

    op.create_table(
        "run_logs",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("output", sa.Text, nullable=False),
        sa.Column("output_bytes", sa.BigInteger, nullable=False),
        sa.Column("dropped_bytes", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("run_id", name="pk_run_logs"),
        sa.ForeignKeyConstraint(["run_id"], ["job_runs.id"], name="fk_run_logs_run_id_job_runs", ondelete="CASCADE"),
    )

    op.create_table(
        "job_dispatch_targets",
        sa.Column("job_id", UUID(as_uuid=True), nullable=False),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("updated_at", TS, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("job_id", name="pk_job_dispatch_targets"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_job_dispatch_targets_job_id_jobs", ondelete="CASCADE"
        ),
    )

    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger, autoincrement=True, nullable=False),
        sa.Column("at", TS, nullable=False, server_default=NOW),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("token_id", sa.String(64)),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("change", JSONB),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_tenant_at", "audit_log", ["tenant", "at"])

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("name", sa.String(128), nullable=False, server_default=sa.text("''")),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=NOW),
        sa.Column("revoked_at", TS),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("secret_hash", name="uq_api_tokens_secret_hash"),
    )


def downgrade() -> None:
    for table in ("api_tokens", "audit_log", "job_dispatch_targets", "run_logs", "run_attempts", "job_runs", "jobs"):
        op.drop_table(table)
