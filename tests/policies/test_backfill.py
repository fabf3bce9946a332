"""`POST /v1/jobs/{slug}/backfill` and `kjob backfill` against a running node: past slots run
once each under the overlap policy; slots the ledger holds are not run again; a bad range is
refused naming its field and changes nothing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from kjob.model.run import RunStatus, Trigger, run_id_for, utc_text
from kjob.model.schedule import next_slots
from kjob.store.audit import list_audit
from kjob.store.runs import RunReads
from kjob.store.slots import SlotRow
from kjob.store.tokens import TokenStore
from tests.policies.conftest import never_overlap, one_line_error, runner_for
from tests.support.gateway import assert_error
from tests.support.ledger import record_slots
from tests.support.pipeline import create_job, fast_settings, running_node, runs_of, until


def hours_ago(n: int) -> datetime:
    return datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=n)


async def test_backfill_runs_the_past_slots_once_each_in_order_under_queue(tmp_path, fresh_nats, database_url,
                                                                          engine, node_client):
    job = await create_job(engine, slug="hourly", prompt="sleep 0.3; echo backfilled", schedule="0 * * * *",
                           overlap="queue")
    start, end = hours_ago(5), hours_ago(1)
    slots = next_slots("0 * * * *", "UTC", start - timedelta(seconds=1), 5)
    assert slots[0] == start and slots[-1] == end
    # one slot of the range is already in the ledger, missed: it never ran, so the backfill runs it
    missed = SlotRow(run_id=run_id_for(job.id, slots[2]), job_id=job.id, tenant=job.tenant, slug=job.slug,
                     slot=slots[2], status=RunStatus.missed, reason="scheduler was down")
    await record_slots(engine, [missed])
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url) as node:
        api = await node_client(node)
        body = {"from": utc_text(start), "to": utc_text(end)}
        response = await api.post("/v1/jobs/hourly/backfill", json=body)
        assert response.status_code == 202, response.text
        result = response.json()
        assert (result["slots"], result["queued"], result["existing"], result["overlap"]) == (5, 5, 0, "queue")
        assert result["run_ids"] == [run_id_for(job.id, s) for s in slots]

        async def all_done():
            runs = [r for r in await runs_of(engine, job) if r.trigger is Trigger.backfill]
            return len(runs) == 5 and all(r.status is RunStatus.succeeded for r in runs) and runs
        done = await until(all_done, 20, "the five backfilled runs to succeed")
        # the same request again finds every slot in the ledger: nothing runs twice
        again = (await api.post("/v1/jobs/hourly/backfill", json=body)).json()
        assert (again["queued"], again["existing"], again["run_ids"]) == (0, 5, [])
    never_overlap(done)
    assert [r.started_at for r in done] == sorted(r.started_at for r in done)  # in slot order
    assert [r.slot for r in await runs_of(engine, job)] == slots  # one row per slot
    rerun = await RunReads(engine).get(job.tenant, missed.run_id)
    assert (rerun.status, rerun.trigger, rerun.reason) == (RunStatus.succeeded, Trigger.backfill, None)
    audit = [e for e in await list_audit(engine, job.tenant, target="job/hourly") if e.action == "job.backfill"]
    assert [e.change["queued"] for e in audit] == [0, 5]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"from": -5, "to": 1}, 422, "to"),  # `to` in the future
        ({"from": -1, "to": -3}, 422, "from"),  # from after to
        ({"from": -1, "to": -1}, 422, "from"),
        ({"from": "2026-11-01T00:00", "to": -1}, 422, "from"),  # no offset
        ({"from": "last tuesday", "to": -1}, 422, "from"),
        ({"to": -1}, 422, "from"),
        ({"from": -5, "to": -1, "overlap": "sometimes"}, 422, "overlap"),
        ({"from": -5, "to": -1, "until": -1}, 422, "until"),
        ({"from": -1001, "to": -1}, 422, "to"),  # 1001 hourly slots: one over the limit
    ],
)
async def test_a_bad_backfill_is_refused_naming_the_field_and_changes_nothing(tmp_path, fresh_nats, database_url,
                                                                              engine, node_client, body, status, field):
    job = await create_job(engine, slug="hourly", prompt="true", schedule="0 * * * *")
    as_text = {k: utc_text(hours_ago(-v)) if isinstance(v, int) else v for k, v in body.items()}
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url,
                            roles=frozenset({"api"})) as node:
        api = await node_client(node)
        assert_error(await api.post("/v1/jobs/hourly/backfill", json=as_text), status, field)
    assert await runs_of(engine, job) == []


async def test_backfill_needs_an_operator_and_an_existing_job_of_the_tenant(tmp_path, fresh_nats, database_url,
                                                                            engine, node_client):
    await create_job(engine, slug="hourly", prompt="true", schedule="0 * * * *")
    body = {"from": utc_text(hours_ago(3)), "to": utc_text(hours_ago(1))}
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url, roles=frozenset({"api"})) as node:
        viewer = await node_client(node, role="viewer")
        assert_error(await viewer.post("/v1/jobs/hourly/backfill", json=body), 403, None)
        other = await node_client(node, role="admin", tenant="acme")
        assert_error(await other.post("/v1/jobs/hourly/backfill", json=body), 404, None)


async def test_kjob_backfill_prints_what_it_queued(tmp_path, fresh_nats, database_url, engine, base_env):
    job = await create_job(engine, slug="hourly", prompt="true", schedule="0 * * * *")
    _, token = await TokenStore(engine).create("default", "operator", "cli")
    start, end = utc_text(hours_ago(3)), utc_text(hours_ago(1))
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url) as node:
        kjob = runner_for({**base_env, "KJOB_API_URL": node.api_url, "KJOB_TOKEN": token})
        result = await _in_thread(kjob, "backfill", "hourly", "--from", start, "--to", end)
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines() == [
            "backfill of hourly: 3 runs queued, 0 slots already in the ledger (not run again); overlap skip",
        ]
        again = await _in_thread(kjob, "backfill", "hourly", "--from", start, "--to", end, "--overlap", "queue")
        assert again.stdout == "backfill of hourly: 0 runs queued, 3 slots already in the ledger (not run again); overlap queue\n"
        future = utc_text(hours_ago(-2))
        one_line_error(await _in_thread(kjob, "backfill", "hourly", "--from", start, "--to", future), "to")
    assert len(await runs_of(engine, job)) == 3


async def _in_thread(kjob, *args):
    # The CLI is synchronous: run it off the event loop, which serves the node it talks to.
    import asyncio

    return await asyncio.to_thread(kjob, *args)
