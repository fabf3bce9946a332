"""The executor's side of security, on real NATS, PostgreSQL and the process sandbox: secrets
reach the agent's environment and nothing else (masked in the stored log, the excerpt, the
Relay body and the live log stream), and a tenant's concurrency quota holds at claim time."""

from __future__ import annotations

import asyncio

import nats
from nats.js.api import DeliverPolicy
from sqlalchemy import text as sql

from kjob.bus import names
from kjob.config import QuotaSettings
from kjob.executor.secrets import LiveMask, Masker
from kjob.model.run import DeliveryStatus, RunStatus
from kjob.store.runs import RunReads
from kjob.store.slots import SlotLedger
from kjob.store.secrets import SecretBox, SecretStore, generate_key
from tests.support.pipeline import ACTOR, create_job, fast_settings, run_to_end, running_node, runs_of, until
from tests.support.recorder import Recorder
from tests.support.relay import RecordingRelay

VALUE = "tok-9f8e7d6c5b4a3210"


async def _live_log(nats_url: str, tenant: str, run_id: str) -> str:
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe(names.run_log(tenant, run_id), ordered_consumer=True,
                                             deliver_policy=DeliverPolicy.ALL)
        chunks = []
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except Exception:  # nothing more within a second: the stream is read
                break
            chunks.append(msg.data.decode())
        return "".join(chunks)
    finally:
        await nc.close()


async def test_a_secret_reaches_the_agent_and_is_masked_everywhere_else(tmp_path, fresh_nats, database_url, engine):
    key = generate_key()
    await SecretStore(engine, SecretBox(key)).set(ACTOR, "api-key", VALUE)
    with RecordingRelay() as relay:
        settings = fast_settings(tmp_path, relay_url=relay.url, secret_key=key)
        job = await create_job(
            engine, slug="uses-secret", schedule="@every 1h", output={"channel": "ops"},
            prompt='echo "key=$API_KEY"; echo "len=${#API_KEY} region=$REGION"; echo "again $API_KEY" >&2',
            sandbox={"env": {"API_KEY": "secret:api-key", "REGION": "eu"}},
        )
        async with running_node(settings, fresh_nats.url, database_url) as node:
            run = await SlotLedger(engine).create_manual(job)
            await node.publish_due(run)

            async def delivered():
                [r] = await runs_of(engine, job)
                return r.delivery_status is DeliveryStatus.delivered and r
            done = await until(delivered, 20, "the run to be delivered")
        output, _, _ = await RunReads(engine).log("default", run.id)
        live = await _live_log(fresh_nats.url, "default", run.id)

    assert done.status is RunStatus.succeeded
    assert f"len={len(VALUE)} region=eu" in output  # the agent had the value itself
    assert "key=***" in output and "again ***" in output
    [body] = [q.json["message"]["body"] for q in relay.accepted]
    for text in (output, done.output_excerpt or "", body, live):
        assert VALUE not in text
    assert "key=***" in body and "key=***" in live


async def test_a_secret_deleted_behind_the_jobs_back_ends_the_run_as_error(tmp_path, fresh_nats, database_url, engine):
    key = generate_key()
    settings = fast_settings(tmp_path, secret_key=key)
    job = await create_job(engine, slug="lost-secret", schedule="@every 1h", prompt="echo hi",
                           sandbox={"env": {"API_KEY": "secret:gone"}})
    async with running_node(settings, fresh_nats.url, database_url) as node:
        done = await run_to_end(node, engine, job)
    assert done.status is RunStatus.error
    assert "gone" in (done.reason or "") and "kjob secret set gone" in (done.reason or "")


async def test_live_masking_catches_a_value_split_across_chunks() -> None:
    sent: list[str] = []

    async def sink(stream: str, text: str) -> None:
        sent.append(text)

    live = LiveMask(Masker(["s3cr3t-value", "s3cr3t"]), sink)
    await live.write("stdout", "a line\n")
    assert sent == ["a line\n"]  # nothing that could start a value: sent at once, not held
    for chunk in ["pre s3c", "r3t-va", "lue mid s3cr", "3t end"]:
        await live.write("stdout", chunk)
    await live.flush()
    assert "".join(sent) == "a line\npre *** mid *** end"


async def test_a_tenants_concurrency_quota_holds_across_the_executor(tmp_path, fresh_nats, database_url, engine):
    quotas = QuotaSettings(tenants={"default": {"max_concurrent_runs": 1}})
    settings = fast_settings(tmp_path, quotas=quotas)
    # Each agent says when it really started and ended (ns): the ledger's timestamps are taken
    # around transactions, the agent's own around the work.
    prompt = "echo start $(date +%s%N); sleep 1; echo end $(date +%s%N)"
    jobs = [await create_job(engine, slug=f"slow-{i}", schedule="@every 1h", prompt=prompt) for i in range(3)]
    async with running_node(settings, fresh_nats.url, database_url) as node:
        ledger = RunReads(engine)
        runs = [await SlotLedger(engine).create_manual(job) for job in jobs]
        await asyncio.gather(*(node.publish_due(run) for run in runs))

        async def all_final():
            done = [r for job in jobs for r in await runs_of(engine, job)]
            return all(r.status.final for r in done) and done
        done = await until(all_final, 45, "the three runs to end")
    assert all(r.status is RunStatus.succeeded for r in done)
    spans = []
    for run in done:
        output, _, _ = await ledger.log("default", run.id)
        marks = dict(line.split() for line in output.split("\n") if line)
        spans.append((int(marks["start"]), int(marks["end"])))
    # one at a time: sorted by start, each started after the previous one ended
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, spans


async def _run_counted(tmp_path, nats_url: str, database_url: str, engine, slug: str, body: str):
    """(the run as it ended, how often its agent ran, counted from outside) of one run of a job
    whose agent does `body`, once the window in which a refused end would have run it again is
    over: the claim lapses within a lease, the message comes back within an ack deadline."""
    with Recorder() as rec:
        settings = fast_settings(tmp_path)
        settings = fast_settings(tmp_path, executor=settings.executor.model_copy(update={"extra_binds": [rec.dir]}))
        job = await create_job(engine, slug=slug, prompt=rec.script(seconds=0.1, body=body), schedule="@every 1h")
        async with running_node(settings, nats_url, database_url) as node:
            ended = await run_to_end(node, engine, job)
            await asyncio.sleep(settings.executor.claim_lease_s * 2 + settings.ack_wait_s)
        assert not rec.errors
        return ended, len(rec.by_run().get(ended.id, []))


async def test_an_agent_printing_nul_bytes_runs_once_and_its_output_is_kept(tmp_path, fresh_nats, database_url, engine):
    """PostgreSQL's text holds no NUL: an agent that prints one (and bytes that are not UTF-8),
    and writes one into its result file (and a lone surrogate), must still have its end
    recorded, once. Were the end refused, the claim would lapse and the agent would run again:
    counted from outside."""
    body = ("printf 'before\\000after \\377\\376 end\\n'; "
            "printf '{\"body\": \"an\\\\u0000swer\\\\ud800\", \"summary\": \"sum\\\\u0000mary\", \"model\": \"m\\\\u0000\"}' > \"$KJOB_RESULT\"")
    ended, executions = await _run_counted(tmp_path, fresh_nats.url, database_url, engine, "nul-printer", body)
    assert executions == 1
    assert ended.status is RunStatus.succeeded, ended
    assert "before\ufffdafter \ufffd\ufffd end" in (ended.output_excerpt or "")
    [attempt] = await RunReads(engine).attempts(ended.id)
    assert attempt.status is RunStatus.succeeded
    async with engine.connect() as conn:
        usage = (await conn.execute(sql("SELECT answer, summary, model FROM run_usage WHERE run_id = :r"),
                                    {"r": ended.id})).one()
    assert tuple(usage) == ("an\ufffdswer\ufffd", "sum\ufffdmary", "m\ufffd")


async def test_an_end_the_ledger_refuses_for_the_agents_words_is_recorded_without_them(tmp_path, fresh_nats,
                                                                                      database_url, engine):
    """Whatever the agent printed, its attempt's end is recorded once: here PostgreSQL itself
    refuses the output (a check constraint the operator added), so the end is written
    without it, saying so, and the agent is not run again (counted from outside)."""
    async with engine.begin() as conn:
        await conn.execute(sql("ALTER TABLE run_logs ADD CONSTRAINT no_refusals CHECK (output NOT LIKE '%refuse-me%')"))
    ended, executions = await _run_counted(tmp_path, fresh_nats.url, database_url, engine, "refused", "echo refuse-me")
    assert executions == 1
    assert ended.status is RunStatus.succeeded and ended.output_excerpt == ""
    assert "refused by the ledger (CheckViolationError) and dropped" in (ended.reason or ""), ended.reason
