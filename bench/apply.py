"""Setup benchmark: `kjob apply -f` of one large job file, as a user would run it, against a
`kjob server --roles api,ticker` process on embedded nats-server and PostgreSQL.

    .venv/bin/python bench/apply.py [--jobs 10000] [--repeat 3]

Prints, for each repeat on a fresh tenant: the first apply (every job created), the same file
again (every job unchanged), and the file with every schedule changed (every job updated).
Target: 10,000 jobs created in <= 10 s.

Where the time went (before; py-spy of the server, 250 jobs, 1.9 s of its CPU, 4 s wall):
one transaction per job of five statements (lock, insert, target, audit, commit) ~45%, one
SELECT per job for the previous version ~10%, the ticker reloading each job by its own query
~10%, SQLAlchemy compiling each statement, and the CLI itself about 2 s (start, TOML, checks).
A file of 1,000 was refused by the 256 KiB body limit. Now: one lookup, one transaction of a
few statements (executemany pages), one job_changed event per 2,000 jobs, the body parsed and
the answer built in a thread (the ticker sharing the loop keeps its lease), the text checked
once for the whole body. What remains (10,000 jobs, some 7 s of server CPU): pydantic
validation of the specs and of the answer's views, the checks, the JSON both ways; the CLI's
TOML parse (1.3 s) and validation.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
    t = time.monotonic()
    done = subprocess.run([KJOB, "apply", "-f", str(path), "-o", "json"], env=env, capture_output=True, text=True)
    took = time.monotonic() - t
    if done.returncode != 0:
        return took, "refused: " + (done.stderr.strip().splitlines() or ["?"])[-1][:160]
    return took, "ok"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", help="py-spy the server during the first apply; write its flame graph here")
    args = parser.parse_args()
    async with Servers("apply") as s:
        node = await s.node("api,ticker", "api-1")
        first, same, changed = s.base / "jobs.toml", s.base / "same.toml", s.base / "changed.toml"
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
            took, result = apply(first, env)
            print(f"         unchanged {took:6.2f} s  ({result})")
            took, result = apply(changed, env)
            print(f"         updated   {took:6.2f} s  ({result})")


if __name__ == "__main__":
    asyncio.run(main())
