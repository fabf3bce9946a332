"""Scale of one ticker: N enabled jobs, inserted with SQL (COPY; the API is bench/apply.py's
business), held and fired by one `kjob server --roles ticker` process. Prints its resident
memory (now and peak), the time from start to every job loaded, and proof that it fires:
slots recorded per second and slot -> published lag of the frequent jobs after the load.

    .venv/bin/python bench/ticker_scale.py [--jobs 1000000] [--repeat 1]

The jobs: 1,000 fire every 10 s (`<i mod 10>/10 * * * * *`, 100 slots/s); the others once a
day at one of 1,440 minutes (`0 <m> <h> * * *`, a herd of ~700 every minute at 1,000,000).
Targets: 1,000,000 jobs in <= 1.5 GB RSS, loaded in <= 30 s (DESIGN.md: 100,000 in <= 300 MB).

Where the memory and the time went (before, 100,000 jobs: 178 MB): per job a ScheduledJob, a
datetime cursor in a dict of every job (`SlotLedger.last_slots`), an `_Entry` dataclass, a heap
tuple and a datetime, about 1 KB, all built at once before any was kept; a full reload of
every job each `resync_s`. Now (kjob/ticker/table.py): columns and a heap of distinct fire
instants, pages of 2,000 jobs with their cursors, a settlement shared by jobs that stopped
at the same instant, resync by version. At 1,000,000 the load stalled the event loop (the
cycle collector over a growing heap, 5,000-row pages) past the lease: now paused, and the
load yields every 20 ms. The next slot and its fire time are computed once per shared
settlement and kept as epoch seconds (`JobTable.put_ts`).

Measured 2026-12-02 (`nice -n 19 .venv/bin/python bench/ticker_scale.py --jobs 1000000
--profile x.txt`, other sessions on the 2 cores): loaded in 44-48 s wall, 27 s of the
ticker's CPU (imports included), 663-666 MB RSS, then firing 100 slots/s. So about half the
wall time the ticker waits (PostgreSQL: two queries a page of 2,000 and a `max(slot)` probe
per row; or the shared cores). py-spy of the CPU part, per job: some 14 us in `_load_one`
(of which ~6 us `JobTable.put_ts`: a UUID's hash is a Python call, nine column appends,
the shared-string lookups), ~8-10 us in `stream_scheduled` (SQLAlchemy's rows, ~4 us
`ScheduledJob` and its policy and jitter look-ups), ~7 us asyncpg decoding on the socket.
Levers left: read the page with asyncpg directly and only the columns the table needs;
bigger pages; key the table by the UUID's int.

2026-12-03, evening (quiet machine, no `nice`): 44.7 s -> 25.2 and 23.1 s from election to
loaded, 35.3 -> 24.9 and 24.0 s of ticker CPU, 669 -> 580 MB. The next page is read while the
ticker works through this one, in one statement through asyncpg's rows (SQLAlchemy's row
processing and the second round trip gone); ScheduledJob is a NamedTuple; the table's columns
grow a quarter at a time. Left: the UUID's hash (a Python call), the nine column writes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import Servers, cpu_s, rss_mb, wait_for  # noqa: E402

from sqlalchemy import text  # noqa: E402

from kjob.model.job import parse_job  # noqa: E402

FREQUENT = 1000
_LOADED = re.compile(r"enabled jobs loaded in ([0-9.]+)s")


def schedule_of(i: int) -> str:
    if i < FREQUENT:
        return f"{i % 10}/10 * * * * *"
    minute = i % 1440
    return f"0 {minute % 60} {minute // 60} * * *"


async def insert_jobs(engine, n: int) -> None:
    """Generated inside PostgreSQL, 20,000 rows a statement (inside the 10 s statement timeout) (`schedule_of` in SQL): Python
    building and sending 1,000,000 rows took minutes here. No dispatch targets: only the
    ticker runs, and it reads none."""
    spec = parse_job({"slug": "x", "prompt": "true", "agent": "shell", "schedule": "@every 1h",
                      "sandbox": {"backend": "process"}, "timeout": "1m"}).model_dump(mode="json")
    schedule = (f"CASE WHEN i < {FREQUENT} THEN (i % 10) || '/10 * * * * *' "
                "ELSE '0 ' || (i % 1440 % 60) || ' ' || (i % 1440 / 60) || ' * * *' END")
    statement = text(f"""
        INSERT INTO jobs (id, tenant, slug, spec, schedule, timezone, agent, enabled, enabled_at, version,
                          created_at, updated_at)
        SELECT gen_random_uuid(), 'bench', 'scale-' || i,
               CAST(:spec AS jsonb) || jsonb_build_object('slug', 'scale-' || i, 'schedule', {schedule}),
               {schedule}, 'UTC', 'shell', true, now(), 1, now(), now()
        FROM generate_series(CAST(:first AS int), CAST(:last AS int)) AS i
    """)
    for first in range(0, n, 20_000):
        async with engine.begin() as conn:
            await conn.execute(statement, {"spec": json.dumps(spec), "first": first,
                                           "last": min(n, first + 20_000) - 1})
    async with engine.connect() as conn:  # as autovacuum would soon after such an insert
        await conn.execute(text("ANALYZE jobs"))
        await conn.commit()


async def fired_since(engine, since: datetime) -> tuple[int, list[float]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT slot, published_at FROM job_runs WHERE slot >= :since AND slot <= now()"), {"since": since})).all()
    return len(rows), [(r.published_at - r.slot).total_seconds() * 1000 for r in rows if r.published_at]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def hwm_mb(pid: int) -> float:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmHWM:"):
            return int(row.split()[1]) / 1024
    return float("nan")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=1, help="ticker starts on the same jobs")
    parser.add_argument("--log", action="store_true", help="print the ticker's log")
    parser.add_argument("--profile", help="py-spy the ticker from its start; write a raw profile here")
    parser.add_argument("--watch", type=float, default=20, help="seconds of firing judged after the load")
    args = parser.parse_args()
    async with Servers("scale", pg_settings={"max_connections": "200", "shared_buffers": "256MB"}) as s:
        t = time.monotonic()
        await insert_jobs(s.engine, args.jobs)
        print(f"ticker scale: {args.jobs:,} enabled jobs ({FREQUENT:,} every 10 s, the rest daily), "
              f"inserted in {time.monotonic() - t:.0f}s; one `kjob server --roles ticker`")
        for r in range(args.repeat):
            node = s.process("ticker", f"ticker-{r}", KJOB_LOG_LEVEL="INFO", KJOB_TICKER__RESYNC_S="60")
            t = time.monotonic()
            node.start()
            spy = None
            if args.profile:
                spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "-p",
                                        str(node.proc.pid), "-o", args.profile, "-f", "raw", "-r", "100"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                loaded = await wait_for(lambda: _LOADED.search(node.logs(200_000)), 300, "the load", every=0.1)
            except TimeoutError:
                print(node.logs(5000))
                raise
            start_s, load_s, load_cpu = time.monotonic() - t, float(loaded[1]), cpu_s(node.proc.pid)
            rss_loaded = rss_mb(node.proc.pid)
            since = datetime.now(timezone.utc) + timedelta(seconds=1)
            await asyncio.sleep(args.watch)
            fired, lags = await fired_since(s.engine, since)
            expected = FREQUENT / 10 * args.watch
            rss, peak = rss_mb(node.proc.pid), hwm_mb(node.proc.pid)
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
            node.stop()
            if args.log:
                print(node.logs(20_000))
            print(f"  run {r + 1}:")
            print(f"    elected -> all jobs loaded          {load_s:7.1f} s     target <= 30 s (1,000,000)")
            print(f"    process start -> all jobs loaded    {start_s:7.1f} s     (imports and connections included)")
            print(f"    ticker CPU, start -> all jobs loaded {load_cpu:6.1f} s     (wall {start_s:.1f} s; the rest is "
                  "waiting on PostgreSQL, or on the other sessions' use of the cores)")
            print(f"    RSS after load / after {args.watch:.0f}s firing   {rss_loaded:5.0f} / {rss:5.0f} MB  "
                  f"(peak {peak:.0f} MB)   target <= 1,500 MB (1,000,000), <= 300 MB (100,000)")
            print(f"    slots recorded in {args.watch:.0f}s after load      {fired:7d}     (frequent jobs alone: "
                  f"{expected:.0f}, plus the daily herds)")
            print(f"    slot -> published p50 / p99         {pct(lags, 50):7.1f} / {pct(lags, 99):.1f} ms")
            assert loaded


if __name__ == "__main__":
    asyncio.run(main())
