"""Catch-up after downtime, on a real pipeline: jobs whose ledger stops long ago (seeded in the
database, as if the scheduler had been down since), across the most recent DST changes (New
York's or Sydney's, found from zoneinfo relative to today: fixed dates would leave the
catch-up window within a year). The ticker settles the downtime when it starts: per the job's
`catchup`, a slot runs (trigger `catchup`) or is written `missed` with its reason; none is
dropped."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

from sqlalchemy import update

from kjob.model.run import MissReason, RunStatus, Trigger, run_id_for
from kjob.store.slots import SlotRow
from kjob.store.tables import jobs
from tests.support.ledger import record_slots
from tests.support.pipeline import create_job, fast_settings, running_node, runs_of, until

UTC = timezone.utc
#: Zones whose spring-forward and fall-back come at different times of year, so the newest of
#: each is at most about seven months old (inside a 366-day window).
ZONES = ("America/New_York", "Australia/Sydney")
LONG = "366d"


@dataclass(frozen=True)
class Change:
    """A DST change in `tz` on `day`, in the local `hour` it skips (spring) or repeats (fall)."""

    tz: str
    day: date
    hour: int

    def local(self, day: date, hour: int, minute: int = 0, fold: int = 0) -> datetime:
        return datetime.combine(day, time(hour, minute, fold=fold), ZoneInfo(self.tz)).astimezone(UTC)

    def cron(self, days: list[date], minute: str = "30", hours: str | None = None) -> str:
        return f"{minute} {hours or self.hour} {','.join(str(d.day) for d in days)} {self.day.month} *"


def newest_change(spring: bool, now: datetime) -> Change:
    """The most recent change of the ZONES at least two days past, with the days its job's
    cron names (spring: the day before and after; fall: the day after) in its month."""
    found = []
    for tz in ZONES:
        zone = ZoneInfo(tz)
        day = now.date() - timedelta(days=2)
        for _ in range(400):
            before = datetime.combine(day, time(0), zone).utcoffset()
            after = datetime.combine(day + timedelta(days=1), time(0), zone).utcoffset()
            whole = (day + timedelta(days=1)).month == day.month and (
                not spring or (day - timedelta(days=1)).month == day.month)  # the days the crons name
            if (after > before if spring else after < before) and whole:
                hour = next(h for h in range(24) if _changes_at(zone, day, h, spring))
                found.append(Change(tz, day, hour))
                break
            day -= timedelta(days=1)
    return max(found, key=lambda c: c.local(c.day, c.hour))


def _changes_at(zone: ZoneInfo, day: date, hour: int, spring: bool) -> bool:
    wall = datetime.combine(day, time(hour, 30), zone)
    if spring:  # the wall time does not exist: it does not come back from UTC
        return wall.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != wall.replace(tzinfo=None)
    return wall.utcoffset() != wall.replace(fold=1).utcoffset()  # it comes twice


def at(moment: datetime | str) -> datetime:
    return moment if isinstance(moment, datetime) else datetime.fromisoformat(moment.replace("Z", "+00:00"))


async def down_since(engine, job, moment: datetime) -> None:
    """Make the job look created (and enabled) at `moment`, before the downtime began."""
    async with engine.begin() as conn:
        await conn.execute(update(jobs).where(jobs.c.id == job.id).values(created_at=moment, enabled_at=moment))


async def test_downtime_over_dst_days_is_settled_by_each_jobs_catchup_rule(tmp_path, fresh_nats, database_url, engine):
    now = datetime.now(UTC)
    spring, fall = newest_change(True, now), newest_change(False, now)
    one = timedelta(days=1)
    # h:30 on the day before, the day of and the day after the spring change: the day of has no
    # h:30 (its slot is the first instant after the gap, (h+1):00 in the new offset)
    SPRING = spring.cron([spring.day - one, spring.day, spring.day + one])
    SPRING_SLOTS = [spring.local(spring.day - one, spring.hour, 30), spring.local(spring.day, spring.hour + 1),
                    spring.local(spring.day + one, spring.hour, 30)]
    # h:30 on the day of the fall change (twice on the wall clock: it runs once, the first) and after
    FALL = fall.cron([fall.day, fall.day + one])
    FALL_SLOTS = [fall.local(fall.day, fall.hour, 30), fall.local(fall.day + one, fall.hour, 30)]
    # every 30 minutes from (h-1):00 to (h+1):59 on the spring day: wildcard minutes follow real time
    SPRING_WILDCARD = spring.cron([spring.day], "*/30", f"{spring.hour - 1}-{spring.hour + 1}")
    SPRING_WILDCARD_SLOTS = [spring.local(spring.day, spring.hour - 1), spring.local(spring.day, spring.hour - 1, 30),
                             spring.local(spring.day, spring.hour + 1), spring.local(spring.day, spring.hour + 1, 30)]
    queue = {"overlap": "queue", "prompt": "echo caught up"}
    at_spring, at_fall = {**queue, "timezone": spring.tz}, {**queue, "timezone": fall.tz}
    spring_all = await create_job(engine, slug="spring-all", schedule=SPRING, catchup={"window": LONG, "policy": "all"}, **at_spring)
    spring_latest = await create_job(engine, slug="spring-latest", schedule=SPRING, catchup={"window": LONG}, **at_spring)
    spring_none = await create_job(engine, slug="spring-none", schedule=SPRING, catchup={"window": LONG, "policy": "none"}, **at_spring)
    spring_1h = await create_job(engine, slug="spring-1h", schedule=SPRING, **at_spring)  # default: latest within 1h
    fall_all = await create_job(engine, slug="fall-all", schedule=FALL, catchup={"window": LONG, "policy": "all"}, **at_fall)
    wildcard = await create_job(engine, slug="wildcard", schedule=SPRING_WILDCARD, catchup={"window": LONG, "policy": "all"}, **at_spring)
    resumed = await create_job(engine, slug="resumed", schedule=SPRING, catchup={"window": LONG, "policy": "all"}, **at_spring)
    for job in (spring_all, spring_latest, spring_none, spring_1h, wildcard):
        await down_since(engine, job, SPRING_SLOTS[0] - timedelta(days=6))
    await down_since(engine, fall_all, FALL_SLOTS[0] - timedelta(days=12))
    # `resumed` has its first slot in the ledger: the ticker resumes after it, not before.
    await down_since(engine, resumed, SPRING_SLOTS[0] - timedelta(days=30))
    seeded = SPRING_SLOTS[0]
    await record_slots(engine, [SlotRow(run_id=run_id_for(resumed.id, seeded), job_id=resumed.id,
                                        tenant=resumed.tenant, slug=resumed.slug, slot=seeded,
                                        status=RunStatus.succeeded)])
    expected_runs = [(spring_all, 3), (spring_latest, 1), (fall_all, 2), (wildcard, 4), (resumed, 2)]

    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url):
        async def caught_up():
            for job, n in expected_runs:
                done = [r for r in await runs_of(engine, job) if r.trigger is Trigger.catchup]
                if len(done) != n or not all(r.status is RunStatus.succeeded for r in done):
                    return False
            return True
        await until(caught_up, 30, "every catch-up run to succeed")

    async def ledger(job):
        return [(r.slot, r.trigger, r.status, r.reason, r.reason_code) for r in await runs_of(engine, job)]

    caught = (Trigger.catchup, RunStatus.succeeded, None, None)
    not_run = "scheduler was down at this slot; catch-up policy '{}' did not run it"
    by_policy = MissReason.catchup_policy
    assert await ledger(spring_all) == [(s, *caught) for s in SPRING_SLOTS]
    assert await ledger(spring_latest) == [
        (SPRING_SLOTS[0], Trigger.schedule, RunStatus.missed, not_run.format("latest"), by_policy),
        (SPRING_SLOTS[1], Trigger.schedule, RunStatus.missed, not_run.format("latest"), by_policy),
        (SPRING_SLOTS[2], *caught),
    ]
    assert await ledger(spring_none) == [
        (s, Trigger.schedule, RunStatus.missed, not_run.format("none"), by_policy) for s in SPRING_SLOTS
    ]
    outside = "scheduler was down at this slot, which is outside the catch-up window (1h)"
    assert await ledger(spring_1h) == [(s, Trigger.schedule, RunStatus.missed, outside, MissReason.outside_catchup_window)
                                       for s in SPRING_SLOTS]
    # the repeated h:30 of the fall day runs once
    assert await ledger(fall_all) == [(s, *caught) for s in FALL_SLOTS]
    assert await ledger(wildcard) == [(s, *caught) for s in SPRING_WILDCARD_SLOTS]
    assert await ledger(resumed) == [
        (seeded, Trigger.schedule, RunStatus.succeeded, None, None), *[(s, *caught) for s in SPRING_SLOTS[1:]]
    ]
    # a catch-up run has the slot's own run key, like the scheduled run it stands for
    assert {r.id for r in await runs_of(engine, spring_all)} == {run_id_for(spring_all.id, s) for s in SPRING_SLOTS}


async def test_catchup_all_under_overlap_skip_runs_the_late_slots_one_after_another(tmp_path, fresh_nats,
                                                                                   database_url, engine):
    # The catch-up rule chose these slots to run: under `skip` they wait for one another
    # instead of skipping one another (kjob.store.overlap.effective_policy).
    job = await create_job(engine, slug="all-skip", schedule="0 * * * *", prompt="sleep 0.5",
                           catchup={"window": "4h", "policy": "all"})
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    await down_since(engine, job, hour - timedelta(hours=2, minutes=30))
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url):
        async def settled():
            runs = [r for r in await runs_of(engine, job) if r.slot <= hour]  # not the next hour's, if it comes
            return len(runs) == 3 and all(r.status.final for r in runs) and runs
        runs = await until(settled, 20, "the three catch-up slots to end")
    assert [(r.slot, r.trigger, r.status) for r in runs] == [
        (hour - timedelta(hours=h), Trigger.catchup, RunStatus.succeeded) for h in (2, 1, 0)]
    started = sorted(runs, key=lambda r: r.started_at)
    assert all(a.finished_at <= b.started_at for a, b in zip(started, started[1:]))
