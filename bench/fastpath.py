"""The fast path (issue 12): n jobs every 10 s, end to end, as a user runs kjob.

    .venv/bin/python bench/fastpath.py                   # 1,000 jobs every 10 s, 90 s judged
    .venv/bin/python bench/fastpath.py --jobs 2000
    .venv/bin/python bench/fastpath.py --jobs 3000       # offered load above the spawn rate: capacity
    .venv/bin/python bench/fastpath.py --pg-stats --profile /tmp/prof   # where the time goes

Embedded nats-server and PostgreSQL (bench/_servers.py: fsync off, as the other benches); the roles as two `kjob server`
processes (`api,ticker` and `executor,dispatcher`, `--groups` to change); the jobs added with
`kjob apply -f` of files of `--per-file` jobs; the built-in `shell` agent running `true` in the
process sandbox (bubblewrap), output `none`, every other setting at its default (`--env
KEY=VALUE` to change one). After `--warmup` seconds, `--seconds` are judged:

- slot -> sandbox start: `job_runs.started_at` (the claim, by the database's clock, just
  before the spawn) minus the slot, for the slots of the judged window;
- slots not run by the end: judged slots (due 2 s or more before the end) not started by then;
- runs/s: runs that finished inside the window;
- CPU per run, per process: its own utime+stime over the window (a server's worker processes
  included, PostgreSQL's backends), divided by the runs finished in it. The sandbox's own
  processes are not counted (they are the executor's children: their CPU is not the
  executor's own); the executor's watchdog process is, and is also printed on its own;
- the raw spawn rate of the same launcher (the sandbox's own chain, `prlimit ... setpriv ...
  bwrap <its flags, its status fd> -- /bin/sh -c true`, 64 in flight from asyncio) for `--spawn-s` before the
  servers start and again after they stopped, and runs/s over it.

Where a run's CPU goes (py-spy of each kjob process with `--profile`, pg_stat_statements with
`--pg-stats`; 1,000 jobs, 2 cores shared with three other sessions, so absolute rates are low):

  before (main of 2026-12-01): 25 ms per run: executor process 18.4, api+ticker 1.6,
  nats-server 1.3, PostgreSQL 3.9; 19.4 statements per run. Of the executor's 18.4 ms: the
  claim 25 % (a transaction of seven round trips: BEGIN, job lock, run row, job enabled?,
  overlap check, claim, COMMIT, each through SQLAlchemy), the agent's usage row 9 % (its own
  BEGIN/INSERT/COMMIT), socket writes 19 % (one per statement and publish), spawning the
  launcher 9 % plus a waitpid thread per child 5 %, the sandbox's work-dir file work in worker
  threads 6-10 %, the finish 3 %, the rest asyncio, tracing and metrics.
  after: 13.1-15.9 ms per run: executor 9.6-10.8, api+ticker 0.7-1.6, nats-server 1.0-1.3,
  PostgreSQL 1.7-3.0; two statements per run from the executor (the claim, the finish with the
  usage row; since 2026-12-03 both in batches of what is asked at once: kjob_claim_many,
  kjob_finish_many) and the ticker's batched ones. What is left in the executor is mostly the
  sandbox's: the launcher's fork/exec and pipes from asyncio (~25 %), its work dir, staged
  $KJOB_RESULT dir (a tmpfs mount) and their removal in worker threads (~20 %); the claim and
  the finish ~4 % each; the watchdog's arm/disarm ~3 %; the four publishes of a run (started,
  log end, finished, ack) ~6 %; metrics ~2 %. The dispatcher does nothing for output `none`:
  such a run's delivery is `none` at its end, and no result is published.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sqlalchemy import text  # noqa: E402

from _servers import (  # noqa: E402
    CpuMeter, Servers, job_files, kjob_cli, kjob_cpu_s, own_cpu_s, server_cpu_s, watchdog_pids)
from pipeline import line, pct  # noqa: E402
from kjob.config import Settings  # noqa: E402
from kjob.executor.agents import AgentRegistry  # noqa: E402
from kjob.executor.sandbox import Launch, make_sandboxes  # noqa: E402
from kjob.executor.sandbox.process import LAUNCHER_ENV, _environment  # noqa: E402
from kjob.model.job import parse_job  # noqa: E402

SPAWN_IN_FLIGHT = 64
PG_STATS = {"shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.track": "all"}


def job_specs(n: int) -> list[dict]:
    return [{"slug": f"fp-{i}", "agent": "shell", "prompt": "true", "schedule": f"{i % 10}/10 * * * * *",
             "sandbox": {"backend": "process"}, "output": {"channel": "none"}} for i in range(n)]


async def spawn_rate(home: Path, seconds: float) -> tuple[float, float]:
    """(spawns/s, child CPU ms per spawn) of the process sandbox's own launcher chain, as the
    executor builds it for the shell agent running `true`, `SPAWN_IN_FLIGHT` at once."""
    settings = Settings(home=home, executor={"sandboxes": ["process"]})
    sandbox = make_sandboxes(settings)["process"]
    await sandbox.start()
    assert sandbox.isolated, sandbox.status()
    agents = AgentRegistry.load(settings.executor.agents_file)
    job = parse_job({"slug": "spawn", "agent": "shell", "prompt": "true", "schedule": "@every 1h"})
    workdir = home / "spawn-work"
    workdir.mkdir(parents=True, exist_ok=True)
    done = 0
    stop_at = time.monotonic() + seconds

    async def spawner(k: int) -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            argv, stdin, env = agents.render(agents.get("shell"), prompt="true", run_id=f"spawn{k}", slug="spawn",
                                             tenant="bench", attempt=1)
            launch = Launch(run_id=f"spawn{k}", tenant="bench", job_slug="spawn", attempt=1, argv=argv, stdin=stdin,
                            env=env, spec=job.sandbox, timeout=job.timeout, output_cap_bytes=1 << 20,
                            work_root=home)
            uid = sandbox._uids.take() if sandbox._uids is not None else None  # noqa: SLF001
            status = os.pipe()  # as the executor's: bwrap reports the agent's exit code on it
            try:
                with sandbox._launcher(workdir, network="none", uid=uid, env=_environment(launch, workdir),  # noqa: SLF001
                                       program=["/bin/sh", *argv[1:]], limits=sandbox._limits(launch),  # noqa: SLF001
                                       status_fd=status[1]) as (cmd, fds):
                    proc = await asyncio.create_subprocess_exec(
                        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.PIPE, cwd="/", env=LAUNCHER_ENV, start_new_session=True,
                        pass_fds=fds)
                os.close(status[1])
                status = (status[0], -1)
                await proc.communicate()
                assert proc.returncode == 0, f"the launcher exited {proc.returncode}"
            finally:
                for fd in status:
                    if fd >= 0:
                        os.close(fd)
                if uid is not None:
                    sandbox._uids.give(uid)  # noqa: SLF001
            done += 1

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    await asyncio.gather(*(spawner(k) for k in range(SPAWN_IN_FLIGHT)))
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    await sandbox.close()
    return done / elapsed, child_cpu * 1000 / max(done, 1)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f} / {five:.1f} (1/5 min) on {os.cpu_count()} cores"


async def ledger_figures(engine, n: int, w0: datetime, w1: datetime, checked: datetime) -> dict:
    judged_end = w1 - timedelta(seconds=2)
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT slot, published_at, started_at, finished_at FROM job_runs "
            "WHERE slot >= :a AND slot < :b AND trigger = 'schedule'"),
            dict(a=w0, b=judged_end))).all()
        finished = (await conn.execute(text(
            "SELECT count(*) FROM job_runs WHERE finished_at >= :a AND finished_at < :b"), dict(a=w0, b=w1))).scalar()
        backlog = (await conn.execute(text(
            "SELECT count(*) FROM job_runs WHERE status = 'scheduled' AND slot < :c"), dict(c=checked))).scalar()
        statuses = dict((await conn.execute(text(
            "SELECT status, count(*) FROM job_runs WHERE slot >= :a AND slot < :b GROUP BY status"),
            dict(a=w0, b=judged_end))).all())
    expected = int(n / 10 * (judged_end - w0).total_seconds())
    lags = [(r.started_at - r.slot).total_seconds() * 1000 for r in rows if r.started_at and r.started_at <= checked]
    # Where the lag goes: the ticker's (slot -> published) and the run's own (claim -> end).
    published = [(r.published_at - r.slot).total_seconds() * 1000 for r in rows if r.published_at]
    walls = [(r.finished_at - r.started_at).total_seconds() * 1000 for r in rows if r.started_at and r.finished_at]
    return dict(expected=expected, in_ledger=len(rows), started=len(lags), lags=lags, finished=finished,
                published=published, walls=walls,
                backlog=backlog, statuses=statuses)


async def pg_statements(engine, runs: int, top: int = 14) -> None:
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT calls, total_exec_time, query FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "ORDER BY total_exec_time DESC LIMIT :n"), dict(n=top))).all()
        total = (await conn.execute(text(
            "SELECT sum(calls), sum(total_exec_time) FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"))).one()
    print(f"\npg_stat_statements over the window: {total[0]} statements, {total[0] / max(runs, 1):.1f} per run, "
          f"{total[1] / max(runs, 1):.2f} ms executing per run")
    print(f"  {'calls/run':>9} {'ms/run':>7} {'ms/call':>7}  statement")
    for r in rows:
        query = " ".join(r.query.split())[:110]
        print(f"  {r.calls / max(runs, 1):9.2f} {r.total_exec_time / max(runs, 1):7.3f} "
              f"{r.total_exec_time / max(r.calls, 1):7.3f}  {query}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000, help="jobs, each every 10 s (jobs/10 slots per second)")
    parser.add_argument("--seconds", type=float, default=90, help="the judged window")
    parser.add_argument("--warmup", type=float, default=15)
    parser.add_argument("--per-file", type=int, default=250, help="jobs per `kjob apply -f` file")
    parser.add_argument("--spawn-s", type=float, default=5, help="each of the two spawn-rate measurements")
    parser.add_argument("--groups", default="api,ticker;executor,dispatcher", help="role groups, one process each")
    parser.add_argument("--env", action="append", default=[], help="KJOB_...=VALUE for the servers (repeatable)")
    parser.add_argument("--pg-stats", action="store_true", help="pg_stat_statements over the window")
    parser.add_argument("--profile", type=Path, help="py-spy each kjob process over the window into this dir")
    args = parser.parse_args()
    env = dict(e.split("=", 1) for e in args.env)
    pg_settings = {"max_connections": "200", **(PG_STATS if args.pg_stats else {})}
    async with Servers("fastpath", pg_settings=pg_settings) as s:
        engine, base = s.engine, s.base
        if args.pg_stats:
            async with engine.begin() as conn:
                await conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
        print(f"kjob fast path: {args.jobs} jobs every 10 s ({args.jobs / 10:.0f} slots/s), groups "
              f"{args.groups!r}, env {env or 'defaults'}; {load()}", flush=True)
        spawn_before = await spawn_rate(base / "spawn", args.spawn_s)
        nodes = [await s.node(roles, f"node-{i}", **{"KJOB_EXECUTOR__SANDBOXES": '["process"]', **env})
                 for i, roles in enumerate(args.groups.split(";"))]
        api_url = next(n.api_url for n in nodes if n.api_url)
        token = await s.token("bench")
        files = job_files(base / "jobfiles", job_specs(args.jobs), args.per_file)
        t = time.monotonic()
        for path in files:
            for attempt in range(3):  # an API slowed by a loaded machine may time out; apply is idempotent
                try:
                    kjob_cli("apply", "-f", str(path), "-o", "json", api_url=api_url, token=token, home=base / "cli")
                    break
                except RuntimeError as err:
                    if "did not answer" not in str(err) or attempt == 2:
                        raise
                    print(f"  (apply of {path.name} timed out; again)", flush=True)
        applied_s = time.monotonic() - t
        await asyncio.sleep(args.warmup)
        meter = CpuMeter()
        for node in nodes:
            meter.add(f"kjob {node.roles}", lambda pid=node.proc.pid: kjob_cpu_s(pid))
            if dogs := watchdog_pids(node.proc.pid):  # counted in its executor's line too
                meter.add(" its watchdog", lambda dogs=dogs: sum(own_cpu_s(d) for d in dogs))
        meter.add("nats-server", lambda: server_cpu_s(s.nats.pid))
        meter.add("postgresql", lambda: server_cpu_s(s.pg.pid))
        now = datetime.now(timezone.utc)
        w0 = now.replace(microsecond=0) + timedelta(seconds=1)
        await asyncio.sleep((w0 - now).total_seconds())
        meter.start()
        if args.pg_stats:
            async with engine.begin() as conn:
                await conn.execute(text("SELECT pg_stat_statements_reset()"))
        profilers = []
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            py_spy = str(Path(sys.executable).with_name("py-spy"))
            profilers = [await asyncio.create_subprocess_exec(
                py_spy, "record", "--nonblocking", "--subprocesses", "-r", "40", "-d", str(int(args.seconds)),
                "-f", "raw", "-o", str(args.profile / f"{node.roles.replace(',', '-')}.txt"), "-p", str(node.proc.pid),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL) for node in nodes]
        await asyncio.sleep(args.seconds)
        spent = meter.stop()
        w1 = w0 + timedelta(seconds=args.seconds)
        checked = datetime.now(timezone.utc)
        figures = await ledger_figures(engine, args.jobs, w0, w1, checked)
        if args.pg_stats:
            await pg_statements(engine, figures["finished"])
        for p in profilers:
            await p.wait()
        load_during = load()
        for node in nodes:
            node.stop()
        spawn_after = await spawn_rate(base / "spawn", args.spawn_s)

    runs = figures["finished"]
    runs_s = runs / args.seconds
    spawn = (spawn_before[0] + spawn_after[0]) / 2
    lags = figures["lags"]
    p99_target = 50 if args.jobs <= 1000 else 250
    print(f"\njudged {w0:%H:%M:%S}-{w1:%H:%M:%S} UTC ({args.seconds:.0f} s after {args.warmup:.0f} s warm-up); {load_during}")
    line("kjob apply of the jobs (s)", f"{applied_s:.1f}", f"files of {args.per_file}")
    line("judged slots in ledger / due", f"{figures['in_ledger']} / {figures['expected']}")
    line("slot -> sandbox start p50 / p99 (ms)", f"{pct(lags, 50):.1f} / {pct(lags, 99):.1f}", f"p99 <= {p99_target} ms")
    line("  of it, slot -> published p50 / p99 (ms)",
         f"{pct(figures['published'], 50):.1f} / {pct(figures['published'], 99):.1f}")
    line("a run, claim -> end p50 / p99 (ms)", f"{pct(figures['walls'], 50):.1f} / {pct(figures['walls'], 99):.1f}")
    line("slots not run by the end", f"{figures['expected'] - figures['started']} of {figures['expected']}", "0")
    line("backlog at the end (scheduled, due)", f"{figures['backlog']}")
    line("runs/s (finished in the window)", f"{runs_s:.1f} of {args.jobs / 10:.0f} due")
    line("raw spawn rate before / after (/s)", f"{spawn_before[0]:.0f} / {spawn_after[0]:.0f}",
         f"child CPU {spawn_before[1]:.1f} / {spawn_after[1]:.1f} ms each")
    bound = " (bounded by the offered load)" if args.jobs / 10 < 0.8 * spawn else ""
    line("runs/s / spawn rate", f"{runs_s / spawn:.2f}", ">= 0.8" + bound)
    total = 0.0
    for name, seconds in spent.items():
        part = name.startswith(" ")  # a part of the line above
        line(f"  of it, {name.strip()} (ms)" if part else f"CPU per run: {name} (ms)", f"{seconds * 1000 / max(runs, 1):.2f}")
        total += 0.0 if part else seconds
    line("CPU per run: all of them (ms)", f"{total * 1000 / max(runs, 1):.2f}", "<= 1.5 ms")
    print(f"  statuses of the judged slots: {figures['statuses']}")


if __name__ == "__main__":
    asyncio.run(main())
