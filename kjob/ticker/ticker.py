"""The ticker: the one process that turns schedules into due runs.

Main loop, top to bottom:
  1. Subscribe to job-changed events (before loading, so no change falls in between).
  2. Load every enabled job and where its schedule stopped in the ledger (not "now": a
     restart must neither repeat nor drop slots), and settle the downtime by the job's
     catch-up rule (kjob.model.catchup): runs inside the window per policy, every other slot
     `missed` with a reason, one by one or, for a long gap, as a compact range.
  3. Sleep until `lookahead_ms` before the earliest next slot, or until an event wakes it.
  4. For every job due within the look-ahead: write the slot into the ledger (one batch),
     publish the due messages (pipelined, `Nats-Msg-Id` = run id, `Kjob-Not-Before` = when it
     fires: executors hold it until then, kjob.bus.hold), mark them published, compute the
     job's next slot. A job changed inside the look-ahead loses its queued slots (the write
     removes them; the ticker too, for a write that raced its queueing).
Jobs are held compactly (kjob.ticker.table): 1,000,000 in well under 1 GB.
A crash between 4's steps loses nothing: the recovery loop re-publishes ledger rows that were
never published, runs whose executor died, retries that never came back, and published runs
whose message the stream no longer holds.

One job never stops the others: a slot whose row the ledger refuses for good (its job was
deleted meanwhile, a value out of range) is left out, logged and counted, and the rest of its
batch is written; a job whose stored row or schedule cannot be computed is skipped. A ledger
that stays unreachable ends the term after `ledger_give_up_s`, so a standby that can reach it
may lead: nothing is retried forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from datetime import datetime, timedelta, timezone
from uuid import UUID

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential

from kjob.bus import names
from kjob.bus.messages import DueRun, Event
from kjob.bus.publish import Acked, Outgoing, publish_acked, publish_result
from kjob.config import TickerSettings
from kjob.model import catchup
from kjob.model.policies import fire_time
from kjob.model.run import MissReason, Run, RunStatus, Trigger, run_id_for
from kjob.model.schedule import Schedule
from kjob.store.database import DatabaseClock, is_row_error
from kjob.store.jobs import JobStore, ScheduledJob, gc_paused
from kjob.store.slots import Deposed, MissedRangeRow, Recorded, SlotLedger, SlotRow
from kjob.telemetry import metrics, tracing
from kjob.bus import hold
from kjob.ticker.leader import Leadership
from kjob.ticker.table import NONE, Due, JobTable
from kjob._tasks import stopped_within

log = logging.getLogger(__name__)

#: Slots fired in one ledger batch; a herd of 10,000 goes out in a few batches.
BATCH_MAX = 2000
#: Changed jobs read back from the store in one query.
RELOAD_CHUNK = 5000
#: The longest the load holds the event loop at a time: the lease is renewed in between.
LOAD_SLICE_S = 0.02


class TermOver(Deposed):
    """This node's own lease deadline passed (or its term ended): it simply stops firing."""


class LedgerUnavailable(Deposed):
    """The ledger could not be written for `ledger_give_up_s`: the term ends (a standby that
    reaches the database may lead), and the node waits before campaigning again."""


class Ticker:
    def __init__(
        self,
        *,
        nc: NATS,
        js: JetStreamContext,
        jobs: JobStore,
        ledger: SlotLedger,
        settings: TickerSettings,
        leadership: Leadership,
    ) -> None:
        self.nc, self.js, self.jobs, self.ledger, self.settings = nc, js, jobs, ledger, settings
        self.leadership = leadership
        #: The term this ticker fires for, read once: a ticker never writes under a later term.
        self.term = leadership.term
        self._table = JobTable()
        #: job id -> fire time (epoch s) of its latest slot queued before it fired: a change
        #: to such a job voids what it queued. Pruned as the instants pass.
        self._ahead: dict[UUID, float] = {}
        self._pruned = 0.0
        self._loaded = False
        #: Slots are written and published this much before they fire; executors hold each
        #: message until its instant (kjob.bus.hold).
        self.lookahead_s = settings.lookahead_ms / 1000
        #: The ticker fires by the database's clock, as claims are judged by it (measured at
        #: start and each recovery).
        self._clock = DatabaseClock(ledger.engine, "ticker")
        self._schedules: dict[str, Schedule] = {}  # shared by every job with the same expression
        self._changed: set[UUID] = set()
        self._resync_soon = False
        self._wake = asyncio.Event()
        #: Why the term ended early, if it did (the ledger's fence, or the ledger unreachable).
        self.ended: Deposed | None = None

    # -- the database's clock -----------------------------------------------------------

    def _now_ts(self) -> float:
        return self._clock.now_ts()

    def _utcnow(self) -> datetime:
        return datetime.fromtimestamp(self._now_ts(), timezone.utc)

    # -- the loop -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self.nc.subscribe(names.event("*", "job_changed"), cb=self._on_job_changed)
        helpers = [
            asyncio.create_task(_every(self.settings.recover_s, stop, self.recover, "recovery pass")),
            asyncio.create_task(_every(self.settings.resync_s, stop, self.resync, "resync")),
        ]
        try:
            await self._clock.measure()
            await self._load()
            while not stop.is_set():
                if self._resync_soon:
                    self._resync_soon = False
                    try:
                        await self.resync()
                    except Exception as err:
                        log.warning("ticker: resync failed (%s)", err)
                await self._apply_changes()
                batch = self._pop_due(self._now_ts() + self.lookahead_s)
                if batch:
                    await self._fire_until_recorded(batch, stop)
                    continue
                await self._sleep(stop)
        except Deposed as err:
            log.warning("ticker: stepping down: %s", err)
            self.ended = err
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            with contextlib.suppress(Exception):  # the connection may already be closed
                await sub.unsubscribe()

    async def _sleep(self, stop: asyncio.Event) -> None:
        # `_wake` is cleared by `_apply_changes` before it takes the changes, never here: a
        # change that came in meanwhile keeps it set, and this returns at once.
        first = self._table.next_fire()
        delay = (first - self.lookahead_s - self._now_ts()) if first is not None else self.settings.resync_s
        if delay <= 0:
            return
        waiters = [asyncio.create_task(self._wake.wait()), asyncio.create_task(stop.wait())]
        await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()

    def _pop_due(self, until_ts: float) -> list[Due]:
        return self._table.pop_due(until_ts, BATCH_MAX, self._advance, self._skip)

    def _advance(self, job_id: UUID, schedule: Schedule, tz: str, jitter: timedelta,
                 slot: datetime) -> tuple[datetime | None, datetime | None]:
        """The job's slot after `slot`, and when it fires."""
        next_slot = schedule.next_slot(slot, tz)
        return next_slot, self._fire_at(job_id, schedule, tz, next_slot, jitter)

    def _fire_at(self, job_id: UUID, schedule: Schedule, tz: str, slot: datetime | None,
                 jitter: timedelta) -> datetime | None:
        return None if slot is None else fire_time(job_id, schedule, tz, slot, jitter)

    async def _fire_until_recorded(self, batch: list[Due], stop: asyncio.Event) -> None:
        """Fire a batch, retrying while the ledger is unreachable (a slot is late, not lost),
        up to `ledger_give_up_s`; then the term ends and the next leader settles the slots."""
        rows = [
            SlotRow(run_id=run_id_for(d.job_id, d.slot), job_id=d.job_id, tenant=d.tenant, slug=d.slug,
                    slot=d.slot, leader_rev=self.fence())
            for d in batch
        ]
        recorded = await self._retry_db(lambda: self._record_rows(rows), stop)
        if recorded is not None:
            fire = {r.run_id: d.fire_ts for r, d in zip(rows, batch)}
            self._note_ahead(batch)
            await self._publish([r for r in rows if r.run_id in recorded.new], fire_ts=fire)

    def _note_ahead(self, batch: list[Due]) -> None:
        now_ts = self._now_ts()
        if now_ts - self._pruned > 1.0:
            self._ahead = {job_id: ts for job_id, ts in self._ahead.items() if ts > now_ts}
            self._pruned = now_ts
        for d in batch:
            if d.fire_ts > now_ts:
                self._ahead[d.job_id] = d.fire_ts

    async def _record_rows(self, rows: list[SlotRow]) -> Recorded:
        """Write the rows; rows the ledger refuses for good are found by halving the batch,
        left out (logged, counted), and the others written. Slots of jobs deleted or disabled
        meanwhile come back as `gone`: those jobs are reloaded, and their entries go."""
        try:
            recorded = await self._record(rows)
        except Exception as err:
            if not is_row_error(err):
                raise
            if len(rows) == 1:
                row = rows[0]
                log.error("ticker: slot %s of job %s/%s cannot be written (%s); it is left out",
                          row.slot.isoformat(), row.tenant, row.slug, err)
                metrics.slots_missed(MissReason.unwritable)
                return Recorded(set(), set())
            half = len(rows) // 2
            first, second = await self._record_rows(rows[:half]), await self._record_rows(rows[half:])
            return Recorded(first.new | second.new, first.gone | second.gone)
        if recorded.gone:
            gone = [r for r in rows if r.run_id in recorded.gone]
            metrics.slots_missed(MissReason.job_gone, sum(1 for r in gone if r.status is RunStatus.scheduled))
            self._changed.update(r.job_id for r in gone)
            self._wake.set()
        return recorded

    async def _publish(self, rows: list[SlotRow], republish: bool = False,
                       fire_ts: dict[str, float] | None = None) -> None:
        """Publish due runs (`Nats-Msg-Id` = run id) and mark those the stream stored; the rest
        stay unpublished in the ledger, and the recovery loop publishes them again. A run
        published before it fires says when (kjob.bus.hold): its executor waits until then."""
        outgoing = []
        now_ts = self._now_ts()
        for r in rows:
            not_before = (fire_ts or {}).get(r.run_id) or r.slot.timestamp()
            msg = DueRun(run_id=r.run_id, job_id=r.job_id, tenant=r.tenant, slug=r.slug, slot=r.slot,
                         trigger=r.trigger, leader_rev=r.leader_rev or 0)
            msg_id = names.due_msg_id(r.run_id, republished_at=int(time.time()) if republish else None)
            subject = names.run_due(r.tenant)
            with tracing.publishing(subject, run_id=r.run_id, tenant=r.tenant, job=r.slug, slot=r.slot,
                                    trigger=r.trigger.value, republish=republish) as trace_headers:
                outgoing.append(Outgoing(subject, msg.encode(), {
                    names.HDR_MSG_ID: msg_id, **names.run_headers(r.run_id, r.tenant),
                    **hold.headers(not_before, now_ts), **trace_headers}))
        try:
            stored = await publish_acked(self.nc, outgoing)
            acked_at = self._utcnow()
        except Exception as err:  # NATS away: everything stays unpublished
            log.warning("ticker: %d due messages not published (%s)", len(rows), err)
            return
        published = [r.run_id for r, ok in zip(rows, stored) if ok]
        for r, ok in zip(rows, stored):
            if ok:
                metrics.run_published(r.slot, r.trigger.value, republish)
        if len(published) < len(rows):
            log.warning("ticker: %d of %d due messages not acked by the stream", len(rows) - len(published), len(rows))
        try:
            await self.ledger.mark_published(published, at=acked_at)
        except Exception as err:
            log.warning("ticker: could not mark %d runs published (%s); recovery will re-check", len(published), err)
        # A run id the stream saw before: its slot was queued, withdrawn (a stop, a change to
        # its job inside the look-ahead) and queued again, and the first message may have been
        # acked unrun meanwhile. Sent again under a fresh id: a copy too many is harmless (the
        # claim lets one delivery run), a run without a message would wait for recovery.
        seen = [r for r, ok in zip(rows, stored) if ok is Acked.DUPLICATE]
        if seen and not republish:
            await self._publish(seen, republish=True, fire_ts=fire_ts)

    # -- jobs in memory ---------------------------------------------------------------------

    def _schedule(self, expr: str) -> Schedule:
        sched = self._schedules.get(expr)
        if sched is None:
            sched = self._schedules[expr] = Schedule.parse(expr)
        return sched

    def _skip(self, job_id: UUID, name: str, err: Exception) -> None:
        """Leave one job out (logged, counted) rather than let it stop the others: its stored
        row or its schedule cannot be computed. A change to the job brings it back."""
        log.error("ticker: job %s is skipped: its slots cannot be computed (%s: %s)", name, type(err).__name__, err)
        metrics.job_skipped("schedule")
        self._table.drop(job_id)

    def _queue_next_slot(self, job: ScheduledJob, schedule: Schedule, next_slot: datetime | None) -> None:
        """Hold the job in the table with `next_slot` (None: it has none) and when that fires."""
        self._table.put(job.id, job.tenant, job.slug, schedule, job.timezone, job.version, job.jitter, next_slot,
                        self._fire_at(job.id, schedule, job.timezone, next_slot, job.jitter))

    async def _load(self) -> None:
        """Stream every enabled job with its cursor, a chunk at a time (the lease is renewed
        in between), settle its downtime, and queue its next slot. Jobs that stopped at the
        same instant with the same schedule and policy (most, after a failover) share one
        settlement: computing it per job would take minutes for 1,000,000 jobs."""
        now = self._utcnow()
        rows: list[SlotRow] = []
        ranges: list[MissedRangeRow] = []
        settlements: dict[tuple, tuple[catchup.Settlement, datetime | None, object, float, float]] = {}
        late_from = catchup.minus(now, timedelta(seconds=self.settings.late_grace_s))
        started = time.monotonic()

        async def load() -> None:
            self._table = JobTable()
            rows.clear()
            ranges.clear()
            yielded = time.monotonic()
            async with contextlib.aclosing(self.jobs.stream_scheduled()) as pages:  # a term over stops its read-ahead
                async for chunk in pages:
                    self._check_term()
                    for job, last_slot in chunk:
                        if time.monotonic() - yielded > LOAD_SLICE_S:
                            await asyncio.sleep(0)  # the lease's renewals run in between
                            self._check_term()
                            yielded = time.monotonic()
                        self._load_one(job, last_slot, now, late_from, settlements, rows, ranges)

        # The load builds no cycles; the collector's passes over a growing heap would hold the
        # event loop (and the lease's renewals) for hundreds of ms at 1,000,000 jobs.
        with gc_paused():
            await self._retry_db(load)
        gc.freeze()  # the table lives as long as the term: later passes need not scan it
        self._loaded = True
        log.info("ticker: %d enabled jobs loaded in %.1fs, %d downtime slots settled one by one, %d in %d ranges",
                 len(self._table), time.monotonic() - started, len(rows), sum(r.count for r in ranges), len(ranges))
        # Ranges first: they are older than the listed slots, and rewriting one is harmless,
        # so a crash in between leaves no slot unaccounted for.
        for i in range(0, len(ranges), BATCH_MAX):
            chunk = ranges[i : i + BATCH_MAX]
            await self._retry_db(lambda: self._record_ranges(chunk))
        for i in range(0, len(rows), BATCH_MAX):
            chunk = rows[i : i + BATCH_MAX]
            recorded = await self._retry_db(lambda: self._record_rows(chunk))
            await self._publish([r for r in chunk if r.run_id in recorded.new and r.status is RunStatus.scheduled])

    def _load_one(self, job: ScheduledJob, last_slot: datetime | None, now: datetime, late_from: datetime,
                  settlements: dict, rows: list[SlotRow], ranges: list[MissedRangeRow]) -> None:
        try:
            schedule = self._schedule(job.schedule)
            start = _resume_point(job, last_slot)
            # A jitter makes fire times depend on the job: only jitter-free settlements are
            # shared. Equal policies are one object (kjob.store.jobs): its id is the key, and
            # the value keeps the object alive, so the id is not reused meanwhile.
            key = (job.schedule, job.timezone, start, id(job.catchup)) if not job.jitter else None
            shared = settlements.get(key) if key is not None else None
            if shared is None:
                first = schedule.next_slot(start, job.timezone)
                if first is None or fire_time(job.id, schedule, job.timezone, first, job.jitter) >= late_from:
                    # No slot was missed (the common case): nothing to settle, and the first
                    # slot after the resume point is the next one (one search, not three).
                    settled, next_slot = catchup.Settlement([], [], start), first
                else:
                    settled = self._settle_downtime(job, schedule, start, now)
                    next_slot = schedule.next_slot(settled.cursor, job.timezone)
                # The next slot and its fire time as the table holds them, computed once per
                # key (a jitter-free fire time is the slot's): some 2 us a job otherwise.
                fire_at = self._fire_at(job.id, schedule, job.timezone, next_slot, job.jitter)
                shared = (settled, next_slot, job.catchup, *_epoch_pair(next_slot, fire_at))
                if key is not None:
                    settlements[key] = shared
            else:
                self._count_settled(job, shared[0])
            settled, next_slot, _, next_ts, fire_ts = shared
        except Exception as err:
            self._skip(job.id, f"{job.tenant}/{job.slug}", err)
            return
        if settled.slots or settled.ranges:
            self._settled_rows(job, settled, rows, ranges)
        self._table.put_ts(job.id, job.tenant, job.slug, schedule, job.timezone, job.version, job.jitter,
                           next_ts, fire_ts)

    def _settled_rows(self, job: ScheduledJob, settled: catchup.Settlement, rows: list[SlotRow],
                      ranges: list[MissedRangeRow]) -> None:
        rows.extend(self._slot_row(job, s.slot, s.trigger, RunStatus.scheduled if s.runs else RunStatus.missed,
                                   s.reason, s.cause) for s in settled.slots)
        ranges.extend(MissedRangeRow(job_id=job.id, tenant=job.tenant, slug=job.slug, first=r.first, last=r.last,
                                     count=r.count, exact=r.exact, reason=r.reason, reason_code=r.cause,
                                     leader_rev=self.fence())
                      for r in settled.ranges)

    def fence(self) -> int:
        """The term's revision, stamped on every slot and checked by the ledger."""
        return self.term

    def _check_term(self) -> None:
        """A leader past its local deadline, or whose term is over, writes nothing."""
        if not self.leadership.valid() or self.leadership.term != self.term:
            raise TermOver("the lease was not renewed in time")

    async def _record(self, rows: list[SlotRow]) -> Recorded:
        self._check_term()
        return await self.ledger.record_slots(rows, fence=self.fence())

    async def _record_ranges(self, ranges: list[MissedRangeRow]) -> int:
        self._check_term()
        return await self.ledger.record_missed_ranges(ranges, fence=self.fence())

    def _settle_downtime(self, job: ScheduledJob, schedule: Schedule, start: datetime,
                         now: datetime) -> catchup.Settlement:
        """The job's slots in (start, now] that no ticker fired, by its catch-up rule
        (kjob.model.catchup). Slots whose fire time (jitter included) is still to come are not
        settled: the ticker fires them as scheduled."""
        settled = catchup.settle_job(job.id, schedule, job.timezone, job.jitter, job.catchup, start, now,
                                     timedelta(seconds=self.settings.late_grace_s))
        self._count_settled(job, settled)
        return settled

    def _count_settled(self, job: ScheduledJob, settled: catchup.Settlement) -> None:
        if not settled.slots and not settled.ranges:
            return
        for cause, count in settled.missed_by_cause().items():
            metrics.slots_missed(cause, count)
        if settled.ranges:
            log.warning("ticker: job %s/%s missed %d slots before its newest %d; recorded as %d range(s)",
                        job.tenant, job.slug, sum(r.count for r in settled.ranges), len(settled.slots),
                        len(settled.ranges))

    def _slot_row(self, job: ScheduledJob, slot: datetime, trigger: Trigger, status: RunStatus,
                  reason: str | None, reason_code: MissReason | None) -> SlotRow:
        return SlotRow(run_id=run_id_for(job.id, slot), job_id=job.id, tenant=job.tenant, slug=job.slug,
                       slot=slot, trigger=trigger, status=status, reason=reason, reason_code=reason_code,
                       leader_rev=self.fence())

    # -- changes ----------------------------------------------------------------------------

    async def _on_job_changed(self, msg) -> None:
        try:
            event = Event.decode(msg.data)
        except ValueError:
            log.warning("ticker: ignoring a malformed job_changed event on %s", msg.subject)
            return
        if event.job_ids:
            self._changed.update(event.job_ids)
        elif event.job_id is not None:
            self._changed.add(event.job_id)
        else:  # from a node that did not name the job (older kjob): reload them all
            self._resync_soon = True
        self._wake.set()

    async def _apply_changes(self) -> None:
        self._wake.clear()  # before taking the changes: one that comes while we await is kept
        if not self._changed:
            return
        changed, self._changed = self._changed, set()
        try:
            await self._reload(list(changed))
        except Exception as err:
            log.warning("ticker: cannot reload %d changed jobs (%s); will retry", len(changed), err)
            self._changed |= changed

    async def _reload(self, job_ids: list[UUID]) -> None:
        """Reconcile these jobs with the store; void the slots this ticker queued ahead for
        those that stopped or were re-timed (the write voided those it saw: these raced it)."""
        now = self._utcnow()
        voids: list[UUID] = []
        for i in range(0, len(job_ids), RELOAD_CHUNK):
            found = await self._read_changed(job_ids[i : i + RELOAD_CHUNK])
            yielded = time.monotonic()
            for job_id, job in found.items():
                if time.monotonic() - yielded > LOAD_SLICE_S:
                    await asyncio.sleep(0)
                    yielded = time.monotonic()
                if self._reconcile(job_id, job, now) and self._ahead.get(job_id, 0.0) > now.timestamp():
                    voids.append(job_id)
        if voids:
            await self.jobs.void_slots_ahead(voids)

    async def _read_changed(self, job_ids: list[UUID]) -> dict[UUID, ScheduledJob | None]:
        if len(job_ids) == 1:  # the common case, one edit: the one-row query
            return {job_ids[0]: await self.jobs.get_scheduled(job_ids[0])}
        return await self.jobs.get_scheduled_many(job_ids)

    def _reconcile(self, job_id: UUID, job: ScheduledJob | None, now: datetime) -> bool:
        """Bring one job's entry in line with the store: from now on, never backwards.
        True if its queued slots are no longer its own (it went, stopped, or was re-timed)."""
        try:
            return self._reconcile_one(job_id, job, now)
        except Exception as err:
            self._skip(job_id, str(job_id) if job is None else f"{job.tenant}/{job.slug}", err)
            return True

    def _reconcile_one(self, job_id: UUID, job: ScheduledJob | None, now: datetime) -> bool:
        if job is None or not job.enabled:
            return self._table.drop(job_id)
        old = self._table.get(job_id)
        if old is not None and old.schedule.expr == job.schedule and old.tz == job.timezone:
            if old.jitter != job.jitter:  # same slots, new delays: the pending slot is kept
                self._queue_next_slot(job, old.schedule, old.next_slot)
            else:
                self._table.set_names(job_id, job.tenant, job.slug, job.version)
            return False
        schedule = self._schedule(job.schedule)
        self._queue_next_slot(job, schedule, schedule.next_slot(now, job.timezone))
        return old is not None

    async def resync(self) -> None:
        """The safety net for a job_changed event that was lost: every enabled job's version
        is compared with the one in memory, and only the jobs that differ are reloaded."""
        if not self._loaded:  # the load reads every job anyway; comparing a half-built table would reload the rest
            return
        differ: list[UUID] = []
        held = 0  # enabled jobs the table holds: fewer than it has, and some went unannounced
        async for chunk in self.jobs.stream_versions():
            for job_id, version in chunk:
                mine = self._table.version_of(job_id)
                held += mine is not None
                if mine != version:
                    differ.append(job_id)
        if held < len(self._table):
            differ.extend(await self._gone())
        if differ:
            await self._reload(differ)
        self._wake.set()

    async def _gone(self) -> list[UUID]:
        """The jobs in memory that are no longer enabled in the store."""
        enabled: set[UUID] = set()
        async for chunk in self.jobs.stream_versions():
            enabled.update(job_id for job_id, _ in chunk)
        return [job_id for job_id in self._table.ids() if job_id not in enabled]

    # -- recovery ---------------------------------------------------------------------------

    async def recover(self) -> int:
        """Re-publish open runs nobody is moving. Returns how many."""
        if not self.leadership.valid():
            return 0
        await self._clock.measure()
        runs = await self.ledger.stranded(older_than=timedelta(seconds=self.settings.recover_s))
        runs += await self._vanished()
        results = await self.ledger.undelivered(timedelta(seconds=self.settings.vanished_after_s))
        for run in results:
            await publish_result(self.js, run)
        if results:
            log.warning("ticker: %d finished runs' results were never delivered nor tried; published them again",
                        len(results))
        if not runs:
            return len(results)
        fresh = [r for r in runs if r.published_at is None]
        stale = [r for r in runs if r.published_at is not None]
        await self._publish([_row_to_republish(r, self.fence()) for r in fresh])
        await self._publish([_row_to_republish(r, self.fence()) for r in stale], republish=True)
        log.info("ticker: re-published %d stranded runs", len(runs))
        return len(runs)

    async def _vanished(self) -> list[Run]:
        """Published runs whose due message the stream no longer holds (purged, or lost with a
        stream that was re-created). A message cannot be looked up by run, so this counts: a
        tenant whose subject holds fewer messages than the ledger has runs that should have
        one gets its runs waiting past `vanished_after_s` published again. A copy too many is
        harmless: the claim lets one delivery run, the others are acked unrun."""
        counts, waiting = await self.ledger.published_waiting(timedelta(seconds=self.settings.vanished_after_s))
        if not waiting:
            return []
        info = await self.js.stream_info(names.RUNS_STREAM, subjects_filter=names.run_due("*"))
        held = info.state.subjects or {}
        short = {t for t, n in counts.items() if held.get(names.run_due(t), 0) < n}
        vanished = [r for r in waiting if r.tenant in short]
        if vanished:
            log.warning("ticker: %d published runs have no message in the stream any more; publishing them again",
                        len(vanished))
        return vanished

    async def _retry_db(self, fn, stop: asyncio.Event | None = None):
        """`await fn()`, retried while the database is unreachable (0.2 s, doubling to 5 s), for
        `ledger_give_up_s` at most; then LedgerUnavailable ends the term. None if `stop` is set
        meanwhile. A Deposed (or a cancellation) is never retried."""
        give_up = time.monotonic() + self.settings.ledger_give_up_s

        def over(state: RetryCallState) -> bool:  # before each sleep, the sleep's length known
            return (stop is not None and stop.is_set()) or time.monotonic() + state.upcoming_sleep > give_up

        def ended(state: RetryCallState) -> None:
            if stop is not None and stop.is_set():
                return None
            err = state.outcome.exception()
            raise LedgerUnavailable(f"the ledger was unreachable for {self.settings.ledger_give_up_s:.0f}s "
                                    f"({type(err).__name__}: {err})") from err

        def waiting(state: RetryCallState) -> None:
            log.warning("ticker: database not ready (%s); retrying in %.1fs", state.outcome.exception(),
                        state.upcoming_sleep)

        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda err: isinstance(err, Exception) and not isinstance(err, Deposed)),
            wait=wait_exponential(multiplier=0.2, max=5.0), stop=over, before_sleep=waiting,
            retry_error_callback=ended)

        async def attempt():  # `fn` may be a lambda: tenacity awaits only what a coroutine function returns
            return await fn()

        return await retrying(attempt)


async def _every(interval_s: float, stop: asyncio.Event, fn, what: str) -> None:
    """Call `fn` every `interval_s` seconds until `stop`; a failure is logged, and tried again
    at the next interval."""
    while not stop.is_set():
        if await stopped_within(stop, interval_s):
            return
        try:
            await fn()
        except Exception as err:
            log.warning("ticker: %s failed (%s)", what, err)


def _epoch_pair(slot: datetime | None, fire_at: datetime | None) -> tuple[float, float]:
    """A slot and its fire time as the table's epoch seconds (NONE both, for no slot)."""
    if slot is None or fire_at is None:
        return NONE, NONE
    return slot.timestamp(), fire_at.timestamp()


def _resume_point(job: ScheduledJob, last_slot: datetime | None) -> datetime:
    return catchup.resume_point(last_slot, job.enabled_at or job.created_at)


def _row_to_republish(run: Run, rev: int) -> SlotRow:
    """A stranded run of the ledger as the slot row `_publish` sends again, under term `rev`."""
    return SlotRow(run_id=run.id, job_id=run.job_id, tenant=run.tenant, slug=run.slug, slot=run.slot,
                   trigger=run.trigger, leader_rev=rev)
