"""The PostgreSQL schema, as SQLAlchemy Core tables. Alembic migrations create exactly this.

`job_runs` is the run ledger: unique on (job_id, slot), it decides exactly-once (invariant 1).
An executor may run a row only after it *claims* it (`claimed_by`, `claim_until`), and may
finish it only while the claim is still its own.
"""

from __future__ import annotations

from sqlalchemy import (
    DDL,
    BigInteger,
    Boolean,
    Float,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

TS = DateTime(timezone=True)

jobs = Table(
    "jobs",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("slug", String(63), nullable=False),
    #: The whole JobSpec as JSON (durations as text); the columns below are copies for queries.
    Column("spec", JSONB, nullable=False),
    Column("schedule", Text, nullable=False),
    Column("timezone", String(64), nullable=False),
    Column("agent", String(64), nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("enabled_at", TS),
    Column("paused_note", Text),
    #: When the job was last paused; NULL while it is enabled.
    Column("paused_at", TS),
    Column("version", Integer, nullable=False, server_default=text("1")),
    Column("created_at", TS, nullable=False, server_default=text("now()")),
    Column("updated_at", TS, nullable=False, server_default=text("now()")),
    UniqueConstraint("tenant", "slug", name="uq_jobs_tenant_slug"),
)

job_runs = Table(
    "job_runs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("job_id", UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("slug", String(63), nullable=False),
    Column("slot", TS, nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    #: Why a slot did not run (missed/skipped), or why the last attempt ended as it did.
    Column("reason", Text),
    #: For a missed or skipped slot, `reason` as a kjob.model.run.MissReason value (migration 0011).
    Column("reason_code", Text),
    Column("attempt", Integer, nullable=False, server_default=text("0")),
    Column("lost_attempts", Integer, nullable=False, server_default=text("0")),
    Column("claimed_by", String(128)),
    Column("claim_until", TS),
    Column("next_attempt_at", TS),
    Column("created_at", TS, nullable=False, server_default=text("now()")),
    Column("published_at", TS),
    Column("started_at", TS),
    Column("finished_at", TS),
    Column("exit_code", Integer),
    Column("error", Text),
    Column("output_excerpt", Text),
    Column("output_bytes", BigInteger),
    Column("leader_rev", BigInteger),
    Column("delivery_status", String(16), nullable=False, server_default=text("'pending'")),
    Column("delivery_attempts", Integer, nullable=False, server_default=text("0")),
    Column("delivery_error", Text),
    Column("delivered_at", TS),
    #: The overlap policy the run starts under, when not its job's (a backfill's choice).
    Column("overlap", String(16)),
    UniqueConstraint("job_id", "slot", name="uq_job_runs_job_slot"),
)
Index("ix_job_runs_job_slot_desc", job_runs.c.job_id, job_runs.c.slot.desc())
Index(
    "ix_job_runs_open",
    job_runs.c.status,
    postgresql_where=text("status IN ('scheduled','running','retrying')"),
)

Index(
    "ix_job_runs_tenant_running",
    job_runs.c.tenant,
    postgresql_where=text("status = 'running'"),
)
#: A job's runs that may hold back a new one under its overlap policy (open, or cancelled and
#: still stopping): each claim looks them up, so this stays small however long the history.
Index(
    "ix_job_runs_busy",
    job_runs.c.job_id,
    job_runs.c.slot,
    postgresql_where=text("status IN ('scheduled','running','retrying') OR claimed_by IS NOT NULL"),
)
#: Short run ids (`kjob logs d05cc3de`): `id LIKE 'prefix%'` reads this range instead of the
#: whole ledger; the primary key's collation-aware order cannot serve LIKE.
Index("ix_job_runs_id_prefix", job_runs.c.id, postgresql_ops={"id": "text_pattern_ops"})

#: One row per attempt of a run: the history behind `job_runs.attempt`.
run_attempts = Table(
    "run_attempts",
    metadata,
    Column("run_id", String(64), ForeignKey("job_runs.id", ondelete="CASCADE"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("executor", String(128)),
    Column("status", String(16), nullable=False),
    Column("started_at", TS, nullable=False),
    Column("finished_at", TS),
    Column("exit_code", Integer),
    Column("reason", Text),
    #: Written by the executor's watchdog when the agent ended while its executor could not
    #: record it (kjob.executor.watchdog); the attempt is concluded from it, never run again.
    Column("agent_exit_code", Integer),
    Column("agent_ended_at", TS),
    PrimaryKeyConstraint("run_id", "attempt", name="pk_run_attempts"),
)

#: Full captured output of the last attempt of a run, up to the executor's cap.
run_logs = Table(
    "run_logs",
    metadata,
    Column("run_id", String(64), ForeignKey("job_runs.id", ondelete="CASCADE"), primary_key=True),
    Column("output", Text, nullable=False),
    Column("output_bytes", BigInteger, nullable=False),
    Column("dropped_bytes", BigInteger, nullable=False, server_default=text("0")),
)

#: Where each job's results go (RFC section 9), resolved when the job is saved.
job_dispatch_targets = Table(
    "job_dispatch_targets",
    metadata,
    Column("job_id", UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("channel", Text, nullable=False),
    #: relay | webhook | none
    Column("kind", String(16), nullable=False),
    Column("updated_at", TS, nullable=False, server_default=text("now()")),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("at", TS, nullable=False, server_default=text("now()")),
    Column("tenant", String(64), nullable=False),
    Column("actor", String(256), nullable=False),
    Column("token_id", String(64)),
    Column("action", String(32), nullable=False),
    Column("target", String(256), nullable=False),
    Column("change", JSONB),
)
Index("ix_audit_log_tenant_at", audit_log.c.tenant, audit_log.c.at)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("name", String(128), nullable=False, server_default=text("''")),
    #: sha256 of the secret; the secret itself is shown once, at creation.
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("created_at", TS, nullable=False, server_default=text("now()")),
    Column("revoked_at", TS),
)

#: Secrets jobs reference from `sandbox.env` (`"secret:<name>"`), encrypted with the node's
#: secret key (kjob.store.secrets); the plaintext is never stored nor returned by the API.
tenant_secrets = Table(
    "tenant_secrets",
    metadata,
    Column("tenant", String(64), nullable=False),
    Column("name", String(64), nullable=False),
    Column("ciphertext", Text, nullable=False),
    Column("created_at", TS, nullable=False, server_default=text("now()")),
    Column("updated_at", TS, nullable=False, server_default=text("now()")),
    PrimaryKeyConstraint("tenant", "name", name="pk_tenant_secrets"),
)

#: Slots a long downtime left unrun beyond those the ticker lists one by one in `job_runs`
#: (kjob.model.catchup): a range per job and reason, with how many slots it holds. Keyed by
#: its first slot, so settling the same downtime again rewrites the record, never adds one.
missed_ranges = Table(
    "missed_ranges",
    metadata,
    Column("job_id", UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("slug", String(63), nullable=False),
    Column("first_slot", TS, nullable=False),
    Column("last_slot", TS, nullable=False),
    Column("count", BigInteger, nullable=False),
    #: False: counting stopped at a cap, there were at least `count` slots.
    Column("count_exact", Boolean, nullable=False, server_default=text("true")),
    Column("reason", Text, nullable=False),
    #: `reason` as a kjob.model.run.MissReason value (migration 0011).
    Column("reason_code", Text),
    Column("leader_rev", BigInteger),
    Column("recorded_at", TS, nullable=False, server_default=text("now()")),
    PrimaryKeyConstraint("job_id", "first_slot", name="pk_missed_ranges"),
)

#: One row: the fencing token (KV revision) of the ticker leader. The ticker's ledger writes
#: only succeed while this row still holds its own revision, so a deposed leader that wakes
#: up (SIGSTOP, a long GC pause) cannot write a slot after a successor took over.
ticker_lease = Table(
    "ticker_lease",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("revision", BigInteger, nullable=False),
    Column("node", String(128), nullable=False),
    Column("acquired_at", TS, nullable=False, server_default=text("now()")),
)

#: What the agent reported per attempt (kjob.executor.adapters, the $KJOB_RESULT file): usage
#: for the ledger and metrics, and the answer the dispatcher sends instead of raw output.
run_usage = Table(
    "run_usage",
    metadata,
    Column("run_id", String(64), ForeignKey("job_runs.id", ondelete="CASCADE"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("job_id", UUID(as_uuid=True), nullable=False),
    Column("agent", String(64), nullable=False),
    Column("model", String(200)),
    Column("tokens_in", BigInteger),
    Column("tokens_out", BigInteger),
    Column("cost_usd", Float),
    Column("turns", Integer),
    Column("answer", Text),
    #: sha256 of the normalized answer: `notify = on_change` compares these
    Column("answer_hash", String(64)),
    Column("summary", Text),
    #: the agent's own word on notifying (result file); NULL: the job's policy decides
    Column("notify", Boolean),
    Column("recorded_at", TS, nullable=False, server_default=text("now()")),
    PrimaryKeyConstraint("run_id", "attempt", name="pk_run_usage"),
)
Index("ix_run_usage_tenant_recorded_at", run_usage.c.tenant, run_usage.c.recorded_at)
Index("ix_run_usage_job_recorded_at", run_usage.c.job_id, run_usage.c.recorded_at)


#: The common claim in one round trip (migration 0009; kjob.store.claims.ClaimLedger.claim): a run's
#: first attempt, of an enabled job whose overlap policy is `skip` (but for a backfill or catch-up
#: slot, which `skip` queues) or `allow`, with no other run of the job busy. It takes the job lock
#: first; each statement after it takes a fresh snapshot (READ COMMITTED, a VOLATILE function), so
#: it sees every claim of the job that held the lock before, as the claim transaction does. The
#: rest it answers `slow`, for the claim transaction. Lock and busy test: kjob.store.overlap.
CLAIM_FIRST_FUNCTION = """
CREATE OR REPLACE FUNCTION kjob_claim_first(p_run_id text, p_executor text, p_lease float8)
RETURNS TABLE (outcome text, run_row text, job_row text)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_job uuid;
    v_run job_runs;
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
    -- started_at: the moment of the claim, after the job lock and the busy check (now() is the
    -- transaction's start, which can precede the end of the run whose lock it waited for).
    UPDATE job_runs SET status = 'running', attempt = attempt + 1, claimed_by = p_executor,
        claim_until = now() + make_interval(secs => p_lease), started_at = clock_timestamp(), next_attempt_at = NULL
        WHERE id = p_run_id RETURNING * INTO v_run;
    INSERT INTO run_attempts (run_id, attempt, executor, status, started_at)
        VALUES (p_run_id, v_run.attempt, p_executor, 'running', v_run.started_at) ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT 'claimed'::text, row_to_json(v_run)::text,
        (SELECT row_to_json(j)::text FROM jobs j WHERE j.id = v_job);
END
$fn$
"""
event.listen(metadata, "after_create", DDL(CLAIM_FIRST_FUNCTION))

#: The statements a node sends at once go together (kjob.store._batch), in one statement and one
#: transaction; each item in a subtransaction of its own, so one the database refuses fails
#: alone (its SQLSTATE and message come back in its row), and never the batch. A batch is at
#: most `BATCH_MAX` items: beyond 64 subtransactions PostgreSQL's snapshots overflow their
#: cache and every backend's visibility checks slow down while it runs.
BATCH_MAX = 64

#: `kjob_claim_first` for a batch of runs (migration 0012). Job by job, in one order for every
#: caller: two batches that share jobs take the job locks in the same order, so neither waits
#: for the other while holding a lock it wants. A run not found is left out.
CLAIM_MANY_FUNCTION = """
CREATE OR REPLACE FUNCTION kjob_claim_many(p_run_ids text[], p_executor text, p_lease float8)
RETURNS TABLE (run_id text, outcome text, run_row text, job_row text)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_id text;
BEGIN
    FOR v_id IN SELECT r.id FROM job_runs r WHERE r.id = ANY(p_run_ids) ORDER BY r.job_id, r.id LOOP
        run_id := v_id;
        BEGIN
            SELECT c.outcome, c.run_row, c.job_row INTO outcome, run_row, job_row
                FROM kjob_claim_first(v_id, p_executor, p_lease) c;
        EXCEPTION WHEN OTHERS THEN
            outcome := 'error'; run_row := SQLSTATE; job_row := SQLERRM;
        END;
        RETURN NEXT;
    END LOOP;
END
$fn$
"""
event.listen(metadata, "after_create", DDL(CLAIM_MANY_FUNCTION))

#: A run's delivery once it ended: `pending` if its job posts results somewhere; a job whose
#: channel is `none` has nothing to deliver, which says so rather than `pending`.
DELIVERY_AFTER_END = """CASE
            WHEN (SELECT kind FROM job_dispatch_targets t WHERE t.job_id = r.job_id) IN ('relay', 'webhook')
                THEN 'pending'
            ELSE 'none' END"""

_USAGE = [c.name for c in run_usage.c if c.name not in ("run_id", "attempt", "recorded_at")]

#: The ends of a batch of attempts (migration 0012; kjob.store.claims.ClaimLedger.finish), each
#: a JSON object of the fields below and `usage` (a run_usage row but its key, or null): the
#: run, its attempt and its log change together or not at all, and only while the claim is
#: ours. The usage row is written whether or not the claim still held: the tokens were spent
#: all the same. Each end's row comes back as JSON (`run_row`; none: the claim was not ours).
FINISH_MANY_FUNCTION = """
CREATE OR REPLACE FUNCTION kjob_finish_many(p_ends jsonb)
RETURNS TABLE (run_id text, error_state text, error_message text, run_row text)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    e record;
BEGIN
    FOR e IN SELECT * FROM jsonb_to_recordset(p_ends) AS x(
            run_id text, executor text, attempt int, run_status text, exit_code int, error text, reason text,
            output_excerpt text, output_bytes bigint, retry_in_s float8, attempt_status text, output text,
            dropped_bytes bigint, reason_code text, usage jsonb) ORDER BY x.run_id LOOP
        run_id := e.run_id; error_state := NULL; error_message := NULL; run_row := NULL;
        BEGIN
            WITH fin AS (
                UPDATE job_runs r SET
                    status = e.run_status, exit_code = e.exit_code, error = e.error, reason = e.reason,
                    output_excerpt = e.output_excerpt, output_bytes = e.output_bytes, reason_code = e.reason_code,
                    claimed_by = NULL, claim_until = NULL,
                    -- the database's clock, as for claims: a node whose clock is off must not move retries
                    next_attempt_at = CASE WHEN e.retry_in_s IS NULL THEN NULL ELSE now() + make_interval(secs => e.retry_in_s) END,
                    finished_at = CASE WHEN e.retry_in_s IS NULL THEN now() ELSE r.finished_at END,
                    delivery_status = CASE WHEN e.retry_in_s IS NOT NULL THEN r.delivery_status ELSE """ + DELIVERY_AFTER_END + """ END
                WHERE r.id = e.run_id AND r.claimed_by = e.executor AND r.attempt = e.attempt AND r.status = 'running'
                RETURNING r.*
            ), attempt_end AS (
                UPDATE run_attempts a SET status = e.attempt_status, finished_at = now(), exit_code = e.exit_code,
                    reason = e.reason
                WHERE a.run_id = e.run_id AND a.attempt = e.attempt AND EXISTS (SELECT 1 FROM fin)
            ), log AS (
                INSERT INTO run_logs (run_id, output, output_bytes, dropped_bytes)
                SELECT fin.id, e.output, e.output_bytes, e.dropped_bytes FROM fin
                ON CONFLICT (run_id) DO UPDATE
                    SET output = EXCLUDED.output, output_bytes = EXCLUDED.output_bytes, dropped_bytes = EXCLUDED.dropped_bytes
            ), usage_row AS (
                INSERT INTO run_usage (run_id, attempt, """ + ", ".join(_USAGE) + """)
                SELECT e.run_id, e.attempt, """ + ", ".join(f"u.{c}" for c in _USAGE) + """
                FROM jsonb_populate_record(NULL::run_usage, e.usage) u
                WHERE e.usage IS NOT NULL AND EXISTS (SELECT 1 FROM job_runs j WHERE j.id = e.run_id)
                ON CONFLICT (run_id, attempt) DO UPDATE SET """ + ", ".join(f"{c} = EXCLUDED.{c}" for c in _USAGE) + """
            )
            SELECT row_to_json(fin)::text INTO run_row FROM fin;
        EXCEPTION WHEN OTHERS THEN
            error_state := SQLSTATE; error_message := SQLERRM; run_row := NULL;
        END;
        RETURN NEXT;
    END LOOP;
END
$fn$
"""
event.listen(metadata, "after_create", DDL(FINISH_MANY_FUNCTION))
