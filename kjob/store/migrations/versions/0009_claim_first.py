"""The common claim in one round trip: `kjob_claim_first(run, executor, lease)`.

A run's first attempt, of an enabled job whose overlap policy is `skip` (but for a backfill or
catch-up slot, which `skip` queues: kjob.store.overlap.effective_policy) or `allow`, with no
other run of the job busy, is claimed by this function in one statement, without a transaction
of its own around it (kjob.store.runs.RunLedger.claim). It takes the job lock first; each
statement after it takes a fresh snapshot (READ COMMITTED, a VOLATILE function), so it sees
every claim of the job that held the lock before: as the claim transaction does. Whatever else
(a retry, a lapsed claim, a disabled job, `queue` or `replace`, a busy job) it leaves alone and
answers `slow`: the claim transaction decides. The job lock and the busy test are those of
kjob.store.overlap (`job_lock_sql`, `BUSY_SQL`).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

CLAIM_FIRST = """
CREATE OR REPLACE FUNCTION kjob_claim_first(p_run_id text, p_executor text, p_lease float8)
RETURNS TABLE (outcome text, run_row text, job_row text)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_job uuid;
    v_run job_runs%ROWTYPE;
    v_enabled boolean;
    v_policy text;
BEGIN
    SELECT r.job_id INTO v_job FROM job_runs r WHERE r.id = p_run_id;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'none'::text, NULL::text, NULL::text;
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('kjob.job:' || CAST(v_job AS text), 0));
    SELECT r.* INTO v_run FROM job_runs r WHERE r.id = p_run_id FOR UPDATE;
    SELECT j.enabled, coalesce(v_run.overlap, j.spec ->> 'overlap', 'skip') INTO v_enabled, v_policy
        FROM jobs j WHERE j.id = v_job FOR SHARE;
    IF NOT FOUND OR v_run.status IS DISTINCT FROM 'scheduled' OR NOT v_enabled
            OR v_policy NOT IN ('skip', 'allow')
            OR (v_policy = 'skip' AND v_run.trigger IN ('backfill', 'catchup'))
            OR (v_policy = 'skip' AND EXISTS (
                SELECT 1 FROM job_runs o WHERE o.job_id = v_job AND o.id <> p_run_id
                AND (o.status IN ('running', 'retrying') OR (o.status = 'cancelled' AND o.claimed_by IS NOT NULL)))) THEN
        RETURN QUERY SELECT 'slow'::text, NULL::text, NULL::text;
        RETURN;
    END IF;
    UPDATE job_runs SET status = 'running', attempt = attempt + 1, claimed_by = p_executor,
        claim_until = now() + make_interval(secs => p_lease), started_at = now(), next_attempt_at = NULL
        WHERE id = p_run_id RETURNING * INTO v_run;
    INSERT INTO run_attempts (run_id, attempt, executor, status, started_at)
        VALUES (p_run_id, v_run.attempt, p_executor, 'running', now()) ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT 'claimed'::text, row_to_json(v_run)::text,
        (SELECT row_to_json(j)::text FROM jobs j WHERE j.id = v_job);
END
$fn$
"""


def upgrade() -> None:
    op.execute(CLAIM_FIRST)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS kjob_claim_first(text, text, float8)")
