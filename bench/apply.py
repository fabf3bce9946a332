"""Setup benchmark: `kjob apply -f` of one large job file, as a user would run it, against a
`kjob server --roles api,ticker` process on embedded nats-server and PostgreSQL.

    .venv/bin/python bench/apply.py [--jobs 10000] [--repeat 3]

Prints, for each repeat on a fresh tenant: the first apply (every job created), the same file
again (every job unchanged), and the file with every schedule changed (every job updated).
Target: 10,000 jobs created in <= 10 s.

Where the time goes now (2026-12-02, 10,000 jobs, a quiet 2-core machine: about 3 s created,
2.5 - 3 s unchanged, 3.5 - 4.5 s updated, of which the CLI some 1.2 s of CPU and the server
1.4 - 1.9 s): the CLI starts in 0.4 s (it no longer imports the server's stack), parses the
TOML in 0.35 s (tomllib, pure Python; a compiled tomli parses it in 0.1 s) and makes only the
file's own checks; its `-o json` print is 0.1 s. The server: the body's text check 0.05 s, the
parse and validation of the 10,000 specs 0.3 s (with the cycle collector paused; its passes were
2/3 of it), the checks 0.1 - 0.2 s, then one transaction of five statements binding columns as
arrays: created, insert 0.45 s and audit rows 0.15 - 0.4 s (PostgreSQL's own work, the specs as
JSONB), targets 0.1 s; unchanged, the lock, in which PostgreSQL compares the stored specs with
the applied ones, 0.3 s; updated, the lock 0.6 s, the diff of the 10,000 changed specs 0.35 s
and the update 0.4 - 1 s. The answer is each job's slug and action (`results=actions`), 0.02 s.
After the answer, the ticker sharing the process reloads the announced jobs (0.1 - 0.8 s of CPU).

Before (2026-12-01): 9.6 - 11.2 s created on a quiet machine, 17 - 46 s loaded. The CLI spent
4 - 5 s: imports 0.8 s, TOML 0.35 s, validating every job 0.85 s (the server did it again),
dumping and sending the JSON 0.3 s, validating the 10,000 full jobs of the answer 1 s; the server
4 - 5.5 s: the body 0.6 s, reading the stored jobs whole twice, executemany statements through
SQLAlchemy 2.6 s (per-row JSON and binds), building the full answer 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import Servers, cpu_s  # noqa: E402

KJOB = str(Path(sys.executable).with_name("kjob"))


def job_file(n: int, schedule: str) -> str:
    return "".join(
        f'[[job]]\nslug = "bench-{i}"\nprompt = "true"\nagent = "shell"\nschedule = "{schedule}"\n'
        f'timeout = "1m"\nsandbox = {{ backend = "process" }}\noutput = {{ channel = "none" }}\n\n'
        for i in range(n)
    )


def apply(path: Path, env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of one `kjob apply`, and "ok; CLI CPU n s" or why it was refused."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    done = subprocess.run([KJOB, "apply", "-f", str(path), "-o", "json"], env=env, capture_output=True, text=True)
    took = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        return took, "refused: " + (done.stderr.strip().splitlines() or ["?"])[-1][:160]
    cli = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return took, f"ok; CLI CPU {cli:.2f} s"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", help="py-spy the server during the first apply; write its flame graph here")
    args = parser.parse_args()
    async with Servers("apply") as s:
        node = await s.node("api,ticker", "api-1")
        first, changed = s.base / "jobs.toml", s.base / "changed.toml"
        first.write_text(job_file(args.jobs, "@every 1h"))
        changed.write_text(job_file(args.jobs, "@every 2h"))
        print(f"apply: `kjob apply -f` of {args.jobs:,} jobs ({first.stat().st_size / 1e6:.1f} MB of TOML), "
              f"roles api,ticker in one `kjob server`, {os.cpu_count()} cores")
        for r in range(args.repeat):
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("KJOB_")},
                   "KJOB_HOME": str(s.base / f"cli-{r}"), "KJOB_API_URL": node.api_url,
                   "KJOB_TOKEN": await s.token(f"bench{r}")}
            spy = None
            if args.profile and r == 0:
                spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(node.proc.pid),
                                        "-o", args.profile, "-f", "raw", "-r", "200"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
                time.sleep(1)
            cpu0 = cpu_s(node.proc.pid)
            took, result = apply(first, env)
            cpu1 = cpu_s(node.proc.pid)
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
            print(f"  run {r + 1}: created   {took:6.2f} s  ({result}; server CPU {cpu1 - cpu0:.2f} s)   target <= 10 s")
            for name, path in (("unchanged", first), ("updated  ", changed)):
                cpu0 = cpu_s(node.proc.pid)
                took, result = apply(path, env)
                print(f"         {name} {took:6.2f} s  ({result}; server CPU {cpu_s(node.proc.pid) - cpu0:.2f} s)")


if __name__ == "__main__":
    asyncio.run(main())
