"""Pipeline benchmark: fire lag, herd, end-to-end throughput and ticker memory, on embedded
servers (a real nats-server and PostgreSQL), with a no-op shell agent in the process sandbox.

    .venv/bin/python bench/pipeline.py                      # everything (several minutes)
    .venv/bin/python bench/pipeline.py --scenarios steady --jobs 100,1000
    .venv/bin/python bench/pipeline.py --scenarios herd,memory

Each figure is printed beside its target from the design card (DESIGN.md, "Performance targets").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import select, text  # noqa: E402

from kjob.config import DispatcherSettings, ExecutorSettings, Settings, TickerSettings  # noqa: E402
from kjob.embedded import EmbeddedNats, EmbeddedPostgres  # noqa: E402
from kjob.model.job import parse_job  # noqa: E402
from kjob.node import Node  # noqa: E402
from kjob.store.database import create_engine, migrate  # noqa: E402
from kjob.store.tables import job_dispatch_targets, job_runs, jobs  # noqa: E402


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def line(name: str, value: str, target: str = "") -> None:
    print(f"  {name:<44} {value:>14}   {('target ' + target) if target else ''}", flush=True)


async def insert_jobs(engine, n: int, schedule, prompt: str = "true", enabled_at: datetime | None = None) -> None:
    """Bulk insert: the API's one-transaction-per-job path would dominate a 100,000-job setup."""
    now = enabled_at or datetime.now(timezone.utc)
    schedule_of = schedule if callable(schedule) else (lambda i: schedule)
    spec = parse_job({"slug": "x", "prompt": prompt, "agent": "shell", "schedule": schedule_of(0),
                      "sandbox": {"backend": "process"}, "timeout": "1m"}).model_dump(mode="json")
    for start in range(0, n, 5000):
        rows, targets = [], []
        for i in range(start, min(n, start + 5000)):
            job_id = uuid.uuid4()
            slug = f"bench-{i}"
            expr = schedule_of(i)
            rows.append(dict(id=job_id, tenant="bench", slug=slug, spec={**spec, "slug": slug, "schedule": expr}, schedule=expr,
                             timezone="UTC", agent="shell", enabled=True, enabled_at=now, created_at=now, updated_at=now))
            targets.append(dict(job_id=job_id, channel="none", kind="none"))
        async with engine.begin() as conn:
            await conn.execute(jobs.insert(), rows)
            await conn.execute(job_dispatch_targets.insert(), targets)


async def reset(engine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("TRUNCATE jobs, job_runs, run_attempts, run_logs, job_dispatch_targets CASCADE"))


def settings_for(home: Path, concurrency: int) -> Settings:
    return Settings(
        home=home, port=0, log_level="WARNING",
        executor=ExecutorSettings(concurrency=concurrency, sandboxes=["process"]),
        dispatcher=DispatcherSettings(concurrency=64),
        ticker=TickerSettings(resync_s=3600, recover_s=30),
    )


async def run_node_for(settings: Settings, nats_url: str, db_url: str, seconds: float, roles=("ticker", "executor", "dispatcher")):
    stop = asyncio.Event()
    ready = asyncio.Event()
    node = Node(settings=settings, roles=frozenset(roles), nats_url=nats_url, database_url=db_url,
                on_ready=lambda url: ready.set())
    task = asyncio.create_task(node.run(stop))
    await asyncio.wait({task, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    started = time.monotonic()
    await asyncio.sleep(seconds)
    stop.set()
    await task
    return started


async def lags(engine, since: datetime, until: datetime):
    async with engine.connect() as conn:
        rows = (await conn.execute(
            select(job_runs.c.slot, job_runs.c.published_at, job_runs.c.started_at, job_runs.c.finished_at, job_runs.c.status)
            .where(job_runs.c.slot >= since, job_runs.c.slot < until)
        )).all()
    published = [(r.published_at - r.slot).total_seconds() * 1000 for r in rows if r.published_at]
    started = [(r.started_at - r.slot).total_seconds() * 1000 for r in rows if r.started_at]
    return rows, published, started


async def steady(engine, nats_url, db_url, home, n: int, seconds: float) -> None:
    """n jobs every 10 s, spread over the seconds (`<i mod 10>/10 * * * * *`): n/10 slots per
    second, each run end to end."""
    await reset(engine)
    await insert_jobs(engine, n, lambda i: f"{i % 10}/10 * * * * *")
    t0 = datetime.now(timezone.utc)
    await run_node_for(settings_for(home, concurrency=64), nats_url, db_url, seconds)
    # judge only slots that had time to finish, after a warm-up of 10 s
    since, until = t0 + timedelta(seconds=10), t0 + timedelta(seconds=seconds - 5)
    rows, published, started = await lags(engine, since, until)
    done = [r for r in rows if r.status == "succeeded"]
    expected = int(n * (until - since).total_seconds() / 10)
    span = (max(r.finished_at for r in done) - min(r.slot for r in done)).total_seconds() if done else 1
    print(f"\n{n} jobs every 10s ({n / 10:.0f} slots/s), {seconds:.0f}s run, judged slots {since:%H:%M:%S}-{until:%H:%M:%S}")
    line("slots in ledger / expected", f"{len(rows)} / {expected}")
    line("slot -> published p50 / p99 (ms)", f"{pct(published, 50):.1f} / {pct(published, 99):.1f}", "p99 <= 10 ms at 10,000 jobs")
    line("slot -> sandbox start p50 / p99 (ms)", f"{pct(started, 50):.1f} / {pct(started, 99):.1f}", "p99 <= 250 ms")
    line("succeeded runs", f"{len(done)}")
    line("end-to-end runs/s (succeeded / span)", f"{len(done) / span:.0f}", ">= 1,000 runs/s")


async def herd(engine, nats_url, db_url, home, n: int) -> None:
    """n jobs due on the same second: how long until all are published."""
    await reset(engine)
    await insert_jobs(engine, n, "* * * * *")
    now = datetime.now(timezone.utc)
    wait = 60 - now.second - now.microsecond / 1e6
    if wait < 8:  # leave the ticker time to load before the minute turns
        wait += 60
    slot = (now + timedelta(seconds=wait)).replace(microsecond=0)
    await run_node_for(settings_for(home, concurrency=8), nats_url, db_url, wait + 3, roles=("ticker",))
    rows, published, _ = await lags(engine, slot, slot + timedelta(seconds=1))
    print(f"\nherd: {n} jobs due at {slot:%H:%M:%S}")
    line("published / due", f"{len(published)} / {n}")
    line("last published after slot (ms)", f"{max(published) if published else float('nan'):.0f}", "all within 1,000 ms")
    line("slot -> published p50 / p99 (ms)", f"{pct(published, 50):.0f} / {pct(published, 99):.0f}")


async def memory(engine, nats_url, db_url, home, n: int) -> None:
    """n enabled jobs held by a ticker: resident memory of this process, which runs only the ticker."""
    await reset(engine)
    await insert_jobs(engine, n, "@every 1h")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.monotonic()
    await run_node_for(settings_for(home, concurrency=1), nats_url, db_url, 3, roles=("ticker",))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nmemory: {n} enabled jobs in one ticker")
    line("peak RSS of the process (MB)", f"{rss:.0f}", "<= 300 MB")
    line("RSS before loading (MB)", f"{rss_before:.0f}")
    line("load + 3 s run (s)", f"{time.monotonic() - t:.1f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="steady,herd,memory")
    parser.add_argument("--jobs", default="100,1000,10000", help="job counts for the steady scenario")
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--herd", type=int, default=10_000)
    parser.add_argument("--memory-jobs", type=int, default=100_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    scenarios = set(args.scenarios.split(","))
    with tempfile.TemporaryDirectory(prefix="kjob-bench-") as tmp:
        base = Path(tmp)
        os.chmod(base, 0o755)
        nats = EmbeddedNats(base / "nats").start()
        pg = EmbeddedPostgres(base / "pg", durable=False, settings={"max_connections": "200"}).start()
        try:
            db_url = pg.ensure_database("bench")
            engine = create_engine(db_url)
            await migrate(engine)
            print(f"kjob pipeline benchmark on {os.cpu_count()} cores (nats-server and PostgreSQL embedded)")
            if "steady" in scenarios:
                for n in (int(x) for x in args.jobs.split(",")):
                    await steady(engine, nats.url, db_url, base / "home", n, args.seconds)
            if "herd" in scenarios:
                await herd(engine, nats.url, db_url, base / "home", args.herd)
            if "memory" in scenarios:
                await memory(engine, nats.url, db_url, base / "home", args.memory_jobs)
            await engine.dispose()
        finally:
            nats.stop()
            pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
