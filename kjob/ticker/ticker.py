"""The ticker: the one process that turns schedules into due runs.

Main loop, top to bottom:
  1. Subscribe to job-changed events (before loading, so no change falls in between).
  2. Load every enabled job and where its schedule stopped in the ledger (not "now": a
     restart must neither repeat nor drop slots), and settle the downtime by the job's
     catch-up rule: runs inside the window per policy, every other slot `missed` with a reason.
  3. Sleep until the earliest next slot, or until an event wakes it.
  4. For every job due: write the slot into the ledger (one batch), publish the due messages
     (pipelined, `Nats-Msg-Id` = run id), mark them published, compute the job's next slot.
A crash between 4's steps loses nothing: the recovery loop re-publishes ledger rows that were
never published, runs whose executor died, and retries that never came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from uuid import UUID

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from kjob.bus import names
from kjob.bus.messages import DueRun, Event
from kjob.bus.publish import Outgoing, publish_acked
from kjob.config import TickerSettings
from kjob.model.durations import format_duration
from kjob.model.job import CatchupPolicy
from kjob.model.policies import jitter_for
from kjob.model.run import Run, RunStatus, Trigger, run_id_for
from kjob.model.schedule import Schedule
from kjob.store.jobs import JobStore, ScheduledJob
from kjob.store.runs import Deposed, RunLedger, SlotRow
from kjob.telemetry import metrics, tracing
from kjob.ticker.leader import Leadership

log = logging.getLogger(__name__)

#: Slots fired in one ledger batch; a herd of 10,000 goes out in a few batches.
BATCH_MAX = 2000
#: Missed slots enumerated per job after downtime; beyond this they are counted, not listed.
MISSED_SCAN_MAX = 1000


@dataclass(slots=True)
class _Entry:
    job_id: UUID
    tenant: str
    slug: str
    schedule: Schedule
    tz: str
    next_slot: datetime | None
    #: Bumped when the job changes, so stale heap items are skipped instead of searched for.
    version: int = 0
    #: The job's `jitter`: each slot is fired (not recorded) up to this much later.
    jitter: timedelta = timedelta(0)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Ticker:
    def __init__(
        self,
        *,
        nc: NATS,
        js: JetStreamContext,
        jobs: JobStore,
        ledger: RunLedger,
        settings: TickerSettings,
        leadership: Leadership | None = None,
    ) -> None:
        self.nc, self.js, self.jobs, self.ledger, self.settings = nc, js, jobs, ledger, settings
        #: None: this ticker fires unconditionally (a single node that runs no election).
        self.leadership = leadership
        self._entries: dict[UUID, _Entry] = {}
        self._heap: list[tuple[float, int, UUID, int]] = []
        self._seq = 0
        self._schedules: dict[str, Schedule] = {}  # shared by every job with the same expression
        self._changed: set[UUID] = set()
        self._wake = asyncio.Event()

    # -- the loop -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self.nc.subscribe(names.event("*", "job_changed"), cb=self._on_job_changed)
        helpers = [
            asyncio.create_task(_every(self.settings.recover_s, stop, self.recover, "recovery pass")),
            asyncio.create_task(_every(self.settings.resync_s, stop, self.resync, "resync")),
        ]
        try:
            await self._load()
            while not stop.is_set():
                await self._apply_changes()
                batch = self._pop_due(time.time())
                if batch:
                    await self._fire_until_recorded(batch, stop)
                    continue
                await self._sleep(stop)
        except Deposed as err:
            log.warning("ticker: stepping down: %s", err)
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            with contextlib.suppress(Exception):  # the connection may already be closed
                await sub.unsubscribe()

    async def _sleep(self, stop: asyncio.Event) -> None:
        delay = (self._heap[0][0] - time.time()) if self._heap else self.settings.resync_s
        if delay <= 0:
            return
        self._wake.clear()
        waiters = [asyncio.create_task(self._wake.wait()), asyncio.create_task(stop.wait())]
        await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()

    def _pop_due(self, now_ts: float) -> list[tuple[_Entry, datetime]]:
        batch: list[tuple[_Entry, datetime]] = []
        while self._heap and self._heap[0][0] <= now_ts and len(batch) < BATCH_MAX:
            _, _, job_id, version = heapq.heappop(self._heap)
            entry = self._entries.get(job_id)
            if entry is None or entry.version != version or entry.next_slot is None:
                continue
            batch.append((entry, entry.next_slot))
            entry.next_slot = entry.schedule.next_slot(entry.next_slot, entry.tz)
            self._push(entry)
        return batch

    async def _fire_until_recorded(self, batch: list[tuple[_Entry, datetime]], stop: asyncio.Event) -> None:
        """Fire a batch, retrying while the ledger is unreachable: a slot is late, never lost."""
        rows = [
            SlotRow(run_id=run_id_for(e.job_id, slot), job_id=e.job_id, tenant=e.tenant, slug=e.slug,
                    slot=slot, leader_rev=self.fence())
            for e, slot in batch
        ]
        delay = 0.2
        while True:
            try:
                new = await self._record(rows)
                break
            except Deposed:
                raise
            except Exception as err:  # database down or restarting
                if stop.is_set():
                    return
                log.warning("ticker: cannot record %d slots (%s); retrying in %.1fs", len(rows), err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        await self._publish([r for r in rows if r.run_id in new])

    async def _publish(self, rows: list[SlotRow], republish: bool = False) -> None:
        """Publish due runs (`Nats-Msg-Id` = run id) and mark those the stream stored; the rest
        stay unpublished in the ledger, and the recovery loop publishes them again."""
        outgoing = []
        for r in rows:
            msg = DueRun(run_id=r.run_id, job_id=r.job_id, tenant=r.tenant, slug=r.slug, slot=r.slot,
                         trigger=r.trigger.value, leader_rev=r.leader_rev or 0)
            msg_id = f"{r.run_id}.re{int(time.time())}" if republish else r.run_id
            subject = names.run_due(r.tenant)
            with tracing.publishing(subject, run_id=r.run_id, tenant=r.tenant, job=r.slug, slot=r.slot,
                                    trigger=r.trigger.value, republish=republish) as trace_headers:
                outgoing.append(Outgoing(subject, msg.encode(), {
                    "Nats-Msg-Id": msg_id, names.HDR_RUN_ID: r.run_id, names.HDR_TENANT: r.tenant,
                    names.HDR_LEADER_REV: str(r.leader_rev or 0), **trace_headers}))
        try:
            stored = await publish_acked(self.nc, outgoing)
            acked_at = utcnow()
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

    # -- jobs in memory ---------------------------------------------------------------------

    def _schedule(self, expr: str) -> Schedule:
        sched = self._schedules.get(expr)
        if sched is None:
            sched = self._schedules[expr] = Schedule.parse(expr)
        return sched

    def _push(self, entry: _Entry) -> None:
        if entry.next_slot is not None:
            self._seq += 1
            fire_at = entry.next_slot
            if entry.jitter:
                following = entry.schedule.next_slot(fire_at, entry.tz)
                fire_at += jitter_for(entry.job_id, fire_at, entry.jitter, following)
            heapq.heappush(self._heap, (fire_at.timestamp(), self._seq, entry.job_id, entry.version))

    def _set(self, job: ScheduledJob, next_slot: datetime | None) -> None:
        old = self._entries.get(job.id)
        entry = _Entry(job.id, job.tenant, job.slug, self._schedule(job.schedule), job.timezone, next_slot,
                       version=(old.version + 1) if old else 0, jitter=job.jitter)
        self._entries[job.id] = entry
        self._push(entry)

    def _drop(self, job_id: UUID) -> None:
        entry = self._entries.pop(job_id, None)
        if entry is not None:
            entry.version += 1

    async def _load(self) -> None:
        jobs, cursors = await self._retry_db(self._read_all)
        now = utcnow()
        rows: list[SlotRow] = []
        for job in jobs:
            start = _resume_point(job, cursors.get(job.id))
            schedule = self._schedule(job.schedule)
            rows.extend(self._settle_downtime(job, schedule, start, now))
            self._set(job, schedule.next_slot(max(start, now), job.timezone))
        log.info("ticker: %d enabled jobs loaded, %d downtime slots settled", len(jobs), len(rows))
        for i in range(0, len(rows), BATCH_MAX):
            chunk = rows[i : i + BATCH_MAX]
            new = await self._retry_db(lambda: self._record(chunk))
            await self._publish([r for r in chunk if r.run_id in new and r.status is RunStatus.scheduled])

    def fence(self) -> int | None:
        """The leader's revision, stamped on every slot and checked by the ledger."""
        return self.leadership.fence() if self.leadership is not None else None

    async def _record(self, rows: list[SlotRow]) -> set[str]:
        """Write slots under the fence; a leader past its local deadline writes nothing."""
        if self.leadership is not None and not self.leadership.valid():
            raise Deposed("the lease was not renewed in time")
        return await self.ledger.record_slots(rows, fence=self.fence())

    async def _read_all(self) -> tuple[list[ScheduledJob], dict[UUID, datetime]]:
        return await self.jobs.list_scheduled(), await self.ledger.last_slots()

    def _settle_downtime(self, job: ScheduledJob, schedule: Schedule, start: datetime, now: datetime) -> list[SlotRow]:
        """Ledger rows for the slots in (start, now] that no ticker fired.

        Slots at most `late_grace_s` old are merely late (a failover, a quick restart): they run
        as scheduled. Older ones follow the job's catch-up rule: `latest` runs the most recent
        one inside the window (unless a late slot runs anyway), `all` runs those inside the
        window, `none` runs none; every slot that does not run is `missed`, with its reason.
        """
        policy: CatchupPolicy = job.catchup
        window_start = now - policy.window
        late_from = now - timedelta(seconds=self.settings.late_grace_s)
        slots: list[datetime] = []
        for slot in schedule.slots(start, job.timezone):
            if slot > now or len(slots) >= MISSED_SCAN_MAX:
                break
            slots.append(slot)
        late = [s for s in slots if s >= late_from]
        inside = [s for s in slots if window_start < s < late_from]
        if policy.policy == "all":
            catchup = set(inside)
        elif policy.policy == "latest" and not late:
            catchup = set(inside[-1:])
        else:
            catchup = set()
        rows = []
        for slot in slots:
            if slot >= late_from:
                rows.append(self._row(job, slot, Trigger.schedule, RunStatus.scheduled, None))
            elif slot in catchup:
                rows.append(self._row(job, slot, Trigger.catchup, RunStatus.scheduled, None))
            elif slot <= window_start:
                rows.append(self._row(job, slot, Trigger.schedule, RunStatus.missed,
                                      f"scheduler was down at this slot, which is outside the catch-up window ({format_duration(policy.window)})"))
            else:
                rows.append(self._row(job, slot, Trigger.schedule, RunStatus.missed,
                                      f"scheduler was down at this slot; catch-up policy '{policy.policy}' did not run it"))
        missed = [r for r in rows if r.status is RunStatus.missed]
        outside = sum(1 for r in missed if r.slot <= window_start)
        metrics.slots_missed("outside_catchup_window", outside)
        metrics.slots_missed("catchup_policy", len(missed) - outside)
        if len(slots) >= MISSED_SCAN_MAX:
            log.warning("ticker: job %s/%s missed more than %d slots; only the first %d are listed",
                        job.tenant, job.slug, MISSED_SCAN_MAX, MISSED_SCAN_MAX)
        return rows

    def _row(self, job: ScheduledJob, slot: datetime, trigger: Trigger, status: RunStatus, reason: str | None) -> SlotRow:
        return SlotRow(run_id=run_id_for(job.id, slot), job_id=job.id, tenant=job.tenant, slug=job.slug,
                       slot=slot, trigger=trigger, status=status, reason=reason, leader_rev=self.fence())

    # -- changes ----------------------------------------------------------------------------

    async def _on_job_changed(self, msg) -> None:
        try:
            event = Event.decode(msg.data)
        except ValueError:
            log.warning("ticker: ignoring a malformed job_changed event on %s", msg.subject)
            return
        if event.job_id is not None:
            self._changed.add(event.job_id)
            self._wake.set()

    async def _apply_changes(self) -> None:
        if not self._changed:
            return
        changed, self._changed = self._changed, set()
        now = utcnow()
        for job_id in changed:
            try:
                job = await self.jobs.get_scheduled(job_id)
            except Exception as err:
                log.warning("ticker: cannot reload job %s (%s); will retry", job_id, err)
                self._changed.add(job_id)
                continue
            self._reconcile(job_id, job, now)

    def _reconcile(self, job_id: UUID, job: ScheduledJob | None, now: datetime) -> None:
        """Bring one job's entry in line with the store: from now on, never backwards."""
        if job is None or not job.enabled:
            self._drop(job_id)
            return
        old = self._entries.get(job_id)
        if old is not None and old.schedule.expr == job.schedule and old.tz == job.timezone:
            old.tenant, old.slug = job.tenant, job.slug
            if old.jitter != job.jitter:  # same slots, new delays: the pending slot is kept
                old.jitter, old.version = job.jitter, old.version + 1
                self._push(old)
            return
        self._set(job, self._schedule(job.schedule).next_slot(now, job.timezone))

    async def resync(self) -> None:
        """A full reload: the safety net for a job_changed event that was lost."""
        jobs = {j.id: j for j in await self.jobs.list_scheduled()}
        now = utcnow()
        for job_id in set(self._entries) | set(jobs):
            self._reconcile(job_id, jobs.get(job_id), now)
        self._wake.set()

    # -- recovery ---------------------------------------------------------------------------

    async def recover(self) -> int:
        """Re-publish open runs nobody is moving. Returns how many."""
        if self.leadership is not None and not self.leadership.valid():
            return 0
        runs = await self.ledger.stranded(older_than=timedelta(seconds=self.settings.recover_s))
        if not runs:
            return 0
        fresh = [r for r in runs if r.published_at is None]
        stale = [r for r in runs if r.published_at is not None]
        await self._publish([_row_of(r, self.fence()) for r in fresh])
        await self._publish([_row_of(r, self.fence()) for r in stale], republish=True)
        log.info("ticker: re-published %d stranded runs", len(runs))
        return len(runs)

    async def _retry_db(self, fn):
        delay = 0.2
        while True:
            try:
                return await fn()
            except Deposed:
                raise
            except Exception as err:
                log.warning("ticker: database not ready (%s); retrying in %.1fs", err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


async def _every(interval_s: float, stop: asyncio.Event, fn, what: str) -> None:
    """Call `fn` every `interval_s` seconds until `stop`; a failure is logged, and tried again
    at the next interval."""
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        if stop.is_set():
            return
        try:
            await fn()
        except Exception as err:
            log.warning("ticker: %s failed (%s)", what, err)


def _resume_point(job: ScheduledJob, last_slot: datetime | None) -> datetime:
    """Slots after this instant are the job's: after its last recorded slot, and never before
    it was (re-)enabled, so enabling a paused job fires no burst of old slots."""
    floor = job.enabled_at or job.created_at
    return max(last_slot, floor) if last_slot is not None else floor


def _row_of(run: Run, rev: int) -> SlotRow:
    return SlotRow(run_id=run.id, job_id=run.job_id, tenant=run.tenant, slug=run.slug, slot=run.slot,
                   trigger=run.trigger, leader_rev=rev)
