"""The look-ahead (`ticker.lookahead_ms`) is invisible to users: a slot the ticker already
wrote and published ahead of its instant does not run if, before the instant, its job is
disabled, re-scheduled or deleted through the API; an untouched job's slot starts at its
instant, not when it was published. Executions are counted by the agents themselves
(tests/support/recorder.py), outside the product, on a real node with real servers.

Without the voiding of queued slots the three changed jobs would each run the slot: their
messages are already in the stream when the change is made. With warm starts built before the
change (`executor.warm_ahead_s` longer than the time left), each changed job's sandbox is
already built around its agent, held at its gate: the claim must close it unstarted."""

from __future__ import annotations

from datetime import datetime

import pytest

from kjob._time import utcnow
from kjob.model.run import run_id_for
from tests.faults.ticker.conftest import ledger_rows, node_settings, seconds
from tests.sandbox.conftest import processes_with
from tests.support.pipeline import create_job, running_node, until

#: Long enough that the changes fit between a slot's publication and its instant on a
#: loaded machine.
LOOKAHEAD_MS = 6000


@pytest.mark.parametrize("warm", ["built-after-the-change", "built-before-the-change"])
async def test_a_job_changed_inside_the_lookahead_does_not_run_the_queued_slot(
        tmp_path, fresh_nats, database_url, engine, recorder, api, warm):
    script = recorder.script(seconds=0.05)
    names = ("keep", "disable", "retime", "delete", "reprompt")
    jobs = {name: await create_job(engine, slug=name, prompt=script, schedule="@every 10s", overlap="allow")
            for name in names}
    executor = {"warm_starts": 128, "warm_ahead_s": 1.0 if warm == "built-after-the-change" else LOOKAHEAD_MS / 1000}
    async with running_node(node_settings(tmp_path, recorder, executor, lookahead_ms=LOOKAHEAD_MS), fresh_nats.url,
                            database_url) as node:
        client = await api(node)

        async def queued() -> datetime | None:
            """The next slot, once every job has it written and published with 3 s to go."""
            now, slots = utcnow(), set()
            for job in jobs.values():
                ahead = [r for r in await ledger_rows(engine, job.id) if r.published_at and r.slot > now + seconds(3)]
                if not ahead:
                    return None
                slots.add(ahead[0].slot)
            return slots.pop() if len(slots) == 1 else None

        slot = await until(queued, 40, "a slot of every job queued ahead of its instant")
        if warm == "built-before-the-change":
            async def gated() -> bool:  # the gates' shells, one per job, each waiting for "go"
                gates = [p for p in processes_with("kjob-gate") if str(recorder.client_path) in p]
                return len([p for p in gates if p.split(": ", 1)[1].startswith("/bin/sh -c IFS=")]) == len(jobs)

            await until(gated, 10, "a sandbox built ahead for each job's slot, its agent held at the gate")
        r = await client.post("/v1/jobs/disable/disable", json={})
        assert r.status_code == 200, r.text
        # A schedule that cannot have the queued slot (`@every 7s` has it every 70 s, and then
        # running it would be right): the slot's second plus five, once a minute.
        r = await client.patch("/v1/jobs/retime", json={"schedule": f"{(slot.second + 5) % 60} * * * * *"})
        assert r.status_code == 200, r.text
        r = await client.delete("/v1/jobs/delete")
        assert r.status_code == 204, r.text
        # A new prompt keeps the slot, which must run the job as it is now, not as it was
        # when its sandbox was built: this one reports its start and end, then exits 3.
        r = await client.patch("/v1/jobs/reprompt", json={"prompt": recorder.script(seconds=0.05) + "exit 3\n"})
        assert r.status_code == 200, r.text
        assert utcnow() < slot, "the changes took longer than the slot's look-ahead: nothing was tested"

        run_ids = {name: run_id_for(job.id, slot) for name, job in jobs.items()}
        kept = await until(lambda: _completed(recorder, run_ids["keep"]), 30, "the untouched job's slot to run")

        async def reprompted():
            rows = [r for r in await ledger_rows(engine, jobs["reprompt"].id) if r.slot == slot]
            return rows[0] if rows and rows[0].exit_code is not None else None

        assert (await until(reprompted, 30, "the re-prompted job's slot to end")).exit_code == 3, \
            "the slot ran the job's old prompt"
        # the changed jobs' executions would have started with it
        await until(lambda: _after(slot + seconds(2)), 10, "two seconds past the slot")

    # A stopped executor leaves no sandbox built ahead (the next slots' were, in the second case)
    assert [p for p in processes_with("kjob-gate") if str(recorder.client_path) in p] == []
    executed = recorder.by_run()
    assert [name for name in ("disable", "retime", "delete") if run_ids[name] in executed] == []
    assert len(executed[run_ids["reprompt"]]) == 1
    # the untouched slot started at its instant, though it was published seconds before
    assert kept.start_wall >= slot.timestamp() - 0.01
    keep_row = next(r for r in await ledger_rows(engine, jobs["keep"].id) if r.slot == slot)
    assert keep_row.published_at < slot - seconds(2)
    # the queued slots are no slots of the changed jobs any more: gone from the ledger, as if
    # they had never been queued (and the deleted job's runs went with it)
    for name in ("disable", "retime", "delete"):
        assert [r for r in await ledger_rows(engine, jobs[name].id) if r.slot == slot] == [], name


async def _completed(recorder, run_id: str):
    done = [e for e in recorder.by_run().get(run_id, []) if e.finished]
    return done[0] if done else None


async def _after(moment: datetime) -> bool:
    return utcnow() > moment
