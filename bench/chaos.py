"""Chaos benchmark: the fault suite's faults at random, round after round, on one live cluster;
then every slot's executions as the agents themselves counted them, as a histogram.

    .venv/bin/python bench/chaos.py [--faults 50] [--seed 1]

Two `kjob server` nodes (node-a reaches PostgreSQL through a proxy that can black-hole it,
node-b's wall clock runs 30 s ahead under faketime), an embedded nats-server and PostgreSQL,
three every-second jobs and one whose agent works for 10 s (tests/faults/harness.py). Each
round: one fault (PostgreSQL paused past the claim lease, backends terminated as attempts end,
PostgreSQL restarted, node-a partitioned from PostgreSQL, NATS restarted, a node SIGKILLed
or SIGSTOPped mid-run), then a few executions ending normally. Target: every slot 1, none 0 without a ledger
reason, none 2.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kjob.embedded import EmbeddedNats  # noqa: E402
from tests.faults.harness import FAULTS, FaultCluster, executor_sigkill  # noqa: E402


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=10, help="rounds, one random fault each")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    # A SIGKILL at any moment here: an agent that ended just before it is counted as a rerun.
    faults = {**FAULTS, "executor_sigkill": lambda c: executor_sigkill(c, strict=False)}
    started = time.monotonic()
    # Kept when something went wrong: the nodes' logs are in it.
    base = Path(tempfile.mkdtemp(prefix="kjob-chaos-"))
    nats = EmbeddedNats(base / "nats").start()
    cluster = FaultCluster(base, nats)
    counts: dict[str, int] = {}
    try:
        await cluster.start(proxied="node-a", skewed={"node-b": 30})
        await cluster.add_jobs(3, 0.3)
        await cluster.add_jobs(1, 10, slug="slow", schedule="@every 4s")
        await cluster.executions_done(6, timeout=120)
        for round_no in range(1, args.faults + 1):
            name = rng.choice(sorted(faults))
            counts[name] = counts.get(name, 0) + 1
            print(f"round {round_no}/{args.faults}: {name}", flush=True)
            await cluster.running_now(timeout=60)
            try:
                await faults[name](cluster)
            except AssertionError as err:  # it found no moment to strike (e.g. no agent mid-run)
                print(f"  not played: {err}", flush=True)
                counts[name] -= 1
            await cluster.executions_done(4, timeout=120)
        await cluster.end_window(timeout=180)
        verdict = await cluster.verdict(cluster.ended_while_paused)
    except BaseException:
        print(f"sessions in a transaction when it failed:\n{cluster.activity()}", flush=True)
        raise
    finally:
        codes = await cluster.close()
        nats.stop()
    print()
    print(f"faults: {', '.join(f'{k} x{v}' for k, v in sorted(counts.items()))}; "
          f"{time.monotonic() - started:.0f} s; node exit codes {codes}")
    print(f"slots: {verdict.slots}; ran once: {verdict.ran_once}; not run, with a ledger reason: {verdict.not_run}")
    print("completed executions per slot (target: all 1; 0 only with a reason; never 2):")
    width = max(verdict.histogram.values(), default=1)
    for n in sorted(verdict.histogram):
        count = verdict.histogram[n]
        print(f"  {n}: {count:6d} {'#' * max(1, round(40 * count / width))}")
    # A run whose first execution ended while its executor was paused ran again after the
    # lease (nothing could record that end; README, "Left"): shown apart, never beside itself.
    doubled = sum(v for k, v in verdict.histogram.items() if k >= 2) - verdict.reruns
    silent = sum(1 for p in verdict.problems if "no reason" in p)
    overlapping = sum(1 for p in verdict.problems if "overlap" in p)
    print(f"doubled slots: {doubled} (target 0); silently lost slots: {silent} (target 0); "
          f"overlapping executions: {overlapping} (target 0); other problems: "
          f"{len(verdict.problems) - silent - doubled - overlapping}")
    print(f"run again after an end no paused or killed executor could record: {verdict.reruns}")
    for problem in verdict.problems[:20]:
        print("  " + problem)
    if verdict.problems:
        print(f"the nodes' logs are kept in {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
