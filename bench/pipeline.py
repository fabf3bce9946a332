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
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select, text  # noqa: E402

from kjob.bus import names  # noqa: E402
from kjob.bus.setup import connect, ensure_streams  # noqa: E402
from kjob.embedded import EmbeddedNats, EmbeddedPostgres  # noqa: E402
from kjob.model.job import parse_job  # noqa: E402
from tests.support.nodes import SchedulerProcess  # noqa: E402
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


async def reset(engine, nats_url: str) -> None:
    """An empty ledger and empty work streams: a scenario must not inherit another's backlog."""
    async with engine.begin() as conn:
        await conn.execute(text("TRUNCATE jobs, job_runs, run_attempts, run_logs, job_dispatch_targets CASCADE"))
    nc = await connect(nats_url, "bench")
    try:
        js = nc.jetstream()
        await ensure_streams(js, 1)
        for stream in (names.RUNS_STREAM, names.RESULTS_STREAM):
            await js.purge_stream(stream)
    finally:
        await nc.close()


async def run_nodes_for(nats_url: str, db_url: str, base: Path, seconds: float, *, concurrency: int,
                        processes=("ticker", "executor,dispatcher")) -> None:
    """Run the roles as `kjob server` processes, as a production node would (one process per
    role group, so the ticker's loop is not shared with sandboxes), for `seconds`."""
    env = {
        "KJOB_NATS_URL": nats_url, "KJOB_DATABASE_URL": db_url, "KJOB_LOG_LEVEL": "WARNING",
        "KJOB_EXECUTOR__CONCURRENCY": str(concurrency), "KJOB_EXECUTOR__SANDBOXES": '["process"]',
        "KJOB_DISPATCHER__CONCURRENCY": "64", "KJOB_TICKER__RESYNC_S": "3600", "KJOB_TICKER__RECOVER_S": "30",
    }
    nodes = [SchedulerProcess(f"bench-{i}", base, env, roles=roles).start() for i, roles in enumerate(processes)]
    try:
        await asyncio.sleep(seconds)
    finally:
        for node in nodes:
            node.stop()


async def lags(engine, since: datetime, until: datetime):
    async with engine.connect() as conn:
        rows = (await conn.execute(
            select(job_runs.c.slot, job_runs.c.published_at, job_runs.c.started_at, job_runs.c.finished_at, job_runs.c.status)
            .where(job_runs.c.slot >= since, job_runs.c.slot < until)
        )).all()
    published = [(r.published_at - r.slot).total_seconds() * 1000 for r in rows if r.published_at]
    started = [(r.started_at - r.slot).total_seconds() * 1000 for r in rows if r.started_at]
    return rows, published, started


async def steady(engine, nats_url, db_url, home, n: int, seconds: float, *, ticker_only: bool = False) -> None:
    """n jobs every 10 s, spread over the seconds (`<i mod 10>/10 * * * * *`): n/10 slots per
    second. End to end (a ticker process, an executor+dispatcher process), or the ticker alone."""
    await reset(engine, nats_url)
    await insert_jobs(engine, n, lambda i: f"{i % 10}/10 * * * * *")
    t0 = datetime.now(timezone.utc)
    processes = ("ticker",) if ticker_only else ("ticker", "executor,dispatcher")
    await run_nodes_for(nats_url, db_url, home, seconds, concurrency=64, processes=processes)
    end = t0 + timedelta(seconds=seconds)
    # judge slots after a warm-up of 10 s, and leave the last 5 s to finish
    since, until = t0 + timedelta(seconds=10), t0 + timedelta(seconds=seconds - 5)
    rows, published, started = await lags(engine, since, until)
    expected = int(n * (until - since).total_seconds() / 10)
    what = "ticker alone" if ticker_only else "end to end, process sandbox, no-op agent"
    print(f"\n{n} jobs every 10s ({n / 10:.0f} slots/s), {what}, {seconds:.0f}s run, judged slots {since:%H:%M:%S}-{until:%H:%M:%S}")
    line("slots in ledger / expected", f"{len(rows)} / {expected}")
    line("slot -> published p50 / p99 (ms)", f"{pct(published, 50):.1f} / {pct(published, 99):.1f}", "p99 <= 10 ms at 10,000 jobs")
    if ticker_only:
        return
    line("judged slots started / in ledger", f"{len(started)} / {len(rows)}", "every slot runs")
    line("slot -> sandbox start p50 / p99 (ms)", f"{pct(started, 50):.1f} / {pct(started, 99):.1f}", "p99 <= 250 ms")
    async with engine.connect() as conn:
        finished = (await conn.execute(select(func.count()).where(
            job_runs.c.finished_at > end - timedelta(seconds=20), job_runs.c.finished_at <= end))).scalar()
    line("runs finished per second (last 20 s)", f"{finished / 20:.0f}", ">= 1,000 runs/s")


async def herd(engine, nats_url, db_url, home, n: int) -> None:
    """n jobs due on the same second: how long until all are published."""
    await reset(engine, nats_url)
    await insert_jobs(engine, n, "* * * * *")
    now = datetime.now(timezone.utc)
    wait = 60 - now.second - now.microsecond / 1e6
    if wait < 8:  # leave the ticker time to load before the minute turns
        wait += 60
    slot = (now + timedelta(seconds=wait)).replace(microsecond=0)
    await run_nodes_for(nats_url, db_url, home, wait + 3, concurrency=8, processes=("ticker",))
    rows, published, _ = await lags(engine, slot, slot + timedelta(seconds=1))
    print(f"\nherd: {n} jobs due at {slot:%H:%M:%S}")
    line("published / due", f"{len(published)} / {n}")
    line("last published after slot (ms)", f"{max(published) if published else float('nan'):.0f}", "all within 1,000 ms")
    line("slot -> published p50 / p99 (ms)", f"{pct(published, 50):.0f} / {pct(published, 99):.0f}")


async def memory(engine, nats_url, db_url, home, n: int) -> None:
    """n enabled jobs held by a ticker: resident memory of this process, which runs only the ticker."""
    await reset(engine, nats_url)
    await insert_jobs(engine, n, "@every 1h")
    t = time.monotonic()
    node = SchedulerProcess("bench-memory", home, {"KJOB_NATS_URL": nats_url, "KJOB_DATABASE_URL": db_url,
                                                   "KJOB_LOG_LEVEL": "INFO"}, roles="ticker").start()
    try:
        deadline = time.monotonic() + 120
        while "enabled jobs loaded" not in node.logs(100_000) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        loaded = time.monotonic() - t
        await asyncio.sleep(3)
        rss = _rss_mb(node.proc.pid)
    finally:
        node.stop()
    print(f"\nmemory: {n} enabled jobs in one ticker process")
    line("RSS of the ticker process (MB)", f"{rss:.0f}", "<= 300 MB")
    line("start to all jobs loaded (s)", f"{loaded:.1f}")


def _rss_mb(pid: int) -> float:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) / 1024
    return float("nan")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="fire,steady,herd,memory",
                        help="fire (ticker alone), steady (end to end), herd, memory")
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
            if "fire" in scenarios:
                for n in (int(x) for x in args.jobs.split(",")):
                    await steady(engine, nats.url, db_url, base / "home", n, args.seconds, ticker_only=True)
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
