"""A storm of deletes, disables and creates through the API while a herd of every-second jobs
runs on a real node: the other jobs never stop firing, and no slot of a job deleted or
disabled runs after the call returned. Executions are counted by the agents themselves
(tests/support/recorder.py), outside the product.

Before the fix, the first delete stopped every job of the node: the event carried no job
id, the ticker kept the deleted job, and retried the batch that held its slot forever on the
foreign key error."""

from __future__ import annotations

import asyncio
from datetime import datetime

from kjob._time import utcnow
from kjob.model.run import RunStatus, run_id_for
from tests.faults.ticker.conftest import ledger_rows, node_settings, seconds, slots_between
from tests.support.pipeline import create_job, running_node, until

KEEPERS = 3
#: Victims per kind (deleted, disabled); the storm also creates as many new jobs.
PER_KIND = 3


async def test_a_storm_of_deletes_disables_and_creates_never_stops_the_other_jobs(
        tmp_path, fresh_nats, database_url, engine, recorder, api):
    # The victims' agents report their executions; the others only count in the ledger (a
    # report costs two interpreter starts: on a loaded 2-core machine the herd would lag).
    reported = {"prompt": recorder.script(seconds=0.05), "overlap": "allow"}
    common = {"prompt": "true", "overlap": "allow"}
    keepers = [await create_job(engine, slug=f"keep-{i}", **common) for i in range(KEEPERS)]
    doomed = [await create_job(engine, slug=f"doomed-{i}", **reported) for i in range(PER_KIND)]
    paused = [await create_job(engine, slug=f"paused-{i}", **reported) for i in range(PER_KIND)]

    async with running_node(node_settings(tmp_path, recorder), fresh_nats.url, database_url) as node:
        client = await api(node)

        async def ran(jobs, after: datetime, n: int) -> bool | list:
            """True, else the jobs short of `n` runs since `after`, and what they have."""
            short = []
            for job in jobs:
                rows = [r for r in await ledger_rows(engine, job.id) if r.slot > after]
                if sum(1 for r in rows if r.status == RunStatus.succeeded.value) < n:
                    short.append((job.slug, [r.status for r in rows]))
            return not short or _Short(short)

        started = utcnow()
        await until(lambda: ran(keepers + doomed + paused, started, 2), 40,
                    "every job of the herd to run twice")

        returned: dict[str, datetime] = {}

        async def delete(job) -> None:
            r = await client.delete(f"/v1/jobs/{job.slug}")
            assert r.status_code == 204, r.text
            returned[job.slug] = utcnow()

        async def disable(job) -> None:
            r = await client.post(f"/v1/jobs/{job.slug}/disable", json={"note": "storm"})
            assert r.status_code == 200, r.text
            returned[job.slug] = utcnow()

        async def create(i: int) -> dict:
            spec = {"slug": f"new-{i}", "agent": "shell", "schedule": "@every 1s", "timeout": "30s", **common}
            r = await client.post("/v1/jobs", json=spec)
            assert r.status_code == 201, r.text
            return r.json()

        # The storm: each round deletes, disables and creates at once, a little apart, so
        # changes land while the ticker is writing batches and applying earlier changes.
        created = []
        for i in range(PER_KIND):
            *_, new = await asyncio.gather(delete(doomed[i]), disable(paused[i]), create(i))
            created.append(new)
            await asyncio.sleep(0.3)
        storm_over = utcnow()

        # Everyone else keeps firing, every second; the new jobs fire too.
        class New:
            def __init__(self, view: dict) -> None:
                self.id, self.slug = view["id"], view["slug"]
        news = [New(v) for v in created]
        await until(lambda: ran(keepers + news, storm_over, 4), 30,
                    "every other job and every new job to run 4 more times after the storm")
        end = utcnow()

    executions = recorder.by_run()
    # No slot of a deleted or disabled job ran once its call had returned: count the agent's
    # own reports for every run id such a slot would have had.
    for job in doomed + paused:
        late = {run_id_for(job.id, s) for s in slots_between("@every 1s", returned[job.slug], end)}
        ran_late = late & executions.keys()
        assert not ran_late, f"{job.slug}: {len(ran_late)} slots after the {returned[job.slug]} change ran"
    for job in paused:
        rows = await ledger_rows(engine, job.id)
        assert not [r for r in rows if r.started_at and r.started_at > returned[job.slug]]
        assert not [r for r in rows if r.slot > returned[job.slug] + seconds(1)], "slots written after the disable"
    # The keepers lost nothing meanwhile: one slot a second, each run once by its agent.
    for job in keepers:
        rows = [r for r in await ledger_rows(engine, job.id) if started < r.slot < end - seconds(3)]
        slots = [r.slot for r in rows]
        holes = [(a, b) for a, b in zip(slots, slots[1:]) if b - a != seconds(1)]
        assert not holes, holes
        assert all(r.status == RunStatus.succeeded.value for r in rows), [(r.slot, r.status, r.reason) for r in rows]
    # and the victims' agents ran each of their runs once, never two at a time
    assert all(len(e) == 1 for e in executions.values())
    assert not recorder.overlapping()
    assert not recorder.errors



class _Short(list):
    """A falsy list, so `until` keeps polling and reports what was missing."""

    def __bool__(self) -> bool:
        return False
