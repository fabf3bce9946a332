"""Run history retention: each job's `history = { keep_runs = N, keep_days = D }`, pruned in
the background by every node that runs the ticker role (`prune_forever`).

A run is pruned when it is finished and no longer among its job's newest N runs (by slot), or
finished more than D days ago. Never pruned (kjob.model.job.HistoryPolicy): open runs, runs
whose result still waits for delivery, and each job's latest scheduled slot, which is where
the ticker resumes after a restart (pruning it would make the ticker see the whole history as
downtime). Attempts and logs go with their run (ON DELETE CASCADE).

Nodes take turns through a PostgreSQL advisory lock: one prunes while the others skip their
turn. Each pass deletes at most `batch` runs, so one pass never holds locks for long.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob._time import utcnow
from kjob.model.run import FINAL_STATUSES, Trigger
from kjob._tasks import stopped_within

log = logging.getLogger(__name__)

PRUNE_BATCH = 5000

_FINAL = tuple(sorted(s.value for s in FINAL_STATUSES))
_CURSOR_TRIGGERS = (Trigger.schedule.value, Trigger.catchup.value)

# Each limit is found through the (job_id, slot DESC) index: the N-th newest slot, and the
# latest scheduled slot. Runs older than the first, or finished before the day cutoff, go.
_PRUNE_SQL = text("""
WITH policy AS (
    SELECT id AS job_id,
           (spec->'history'->>'keep_runs')::int AS keep_runs,
           (spec->'history'->>'keep_days')::int AS keep_days
    FROM jobs
    WHERE spec->'history'->>'keep_runs' IS NOT NULL OR spec->'history'->>'keep_days' IS NOT NULL
), limits AS (
    SELECT p.job_id,
           CASE WHEN p.keep_runs IS NOT NULL THEN (
               SELECT r.slot FROM job_runs r WHERE r.job_id = p.job_id
               ORDER BY r.slot DESC OFFSET p.keep_runs - 1 LIMIT 1
           ) END AS oldest_kept,
           CASE WHEN p.keep_days IS NOT NULL THEN CAST(:now AS timestamptz) - make_interval(days => p.keep_days) END
               AS finished_before,
           (SELECT r.slot FROM job_runs r WHERE r.job_id = p.job_id AND r.trigger = ANY(:cursor_triggers)
            ORDER BY r.slot DESC LIMIT 1) AS cursor_slot
    FROM policy p
), doomed AS (
    SELECT r.id FROM limits l JOIN job_runs r ON r.job_id = l.job_id
    WHERE (r.slot < l.oldest_kept OR r.finished_at < l.finished_before)
      AND r.slot IS DISTINCT FROM l.cursor_slot
      AND r.status = ANY(:final)
      AND r.delivery_status <> 'pending'
    LIMIT :batch
)
DELETE FROM job_runs WHERE id IN (SELECT id FROM doomed)
""")


async def prune(engine: AsyncEngine, *, now: datetime | None = None, batch: int = PRUNE_BATCH) -> int | None:
    """Delete up to `batch` runs past their job's history policy. Returns how many, or None
    when another node is pruning right now."""
    now = now or utcnow()
    async with engine.begin() as conn:
        mine = (await conn.execute(text("SELECT pg_try_advisory_xact_lock(hashtextextended('kjob.retention', 0))"))).scalar()
        if not mine:
            return None
        result = await conn.execute(_PRUNE_SQL, {
            "now": now, "batch": batch, "final": list(_FINAL), "cursor_triggers": list(_CURSOR_TRIGGERS),
        })
        return result.rowcount


async def prune_forever(engine: AsyncEngine, stop: asyncio.Event, every_s: float) -> None:
    """Prune every `every_s` seconds until `stop`; a full batch is followed at once by the next."""
    while not stop.is_set():
        try:
            pruned = await prune(engine)
        except Exception as err:  # database away: try again next time
            log.warning("retention: pruning run history failed (%s); retrying in %.0fs", err, every_s)
            pruned = None
        if pruned:
            log.info("retention: pruned %d runs past their job's history policy", pruned)
        if pruned == PRUNE_BATCH:
            continue
        await stopped_within(stop, every_s)
