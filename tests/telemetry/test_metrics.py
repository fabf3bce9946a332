"""`GET /metrics` on a running node: the runs it ran are counted, their fire lag observed."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kjob.model.run import DeliveryStatus
from kjob.telemetry import metrics
from tests.support.pipeline import (
    create_job,
    fast_settings,
    running_node,
    runs_of,
    until,
)
from tests.support.relay import RecordingRelay


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scrape: dict, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist yet (a counter never incremented)."""
    return scrape.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: httpx.AsyncClient) -> dict:
    answer = await client.get("/metrics")  # no token: scrapers carry none
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return samples(answer.text)


async def test_metrics_count_the_run_and_observe_its_fire_lag(tmp_path, fresh_nats, database_url, engine):
    with RecordingRelay() as relay:
        settings = fast_settings(tmp_path, relay_url=relay.url, node_name="metrics-node", metrics_poll_s=0.2)
        job = await create_job(engine, slug="counted", prompt="echo counted", output={"channel": "kode-chat:ops"})
        # Metrics are the process's: earlier tests may have counted runs, so compare with now.
        before = samples(metrics.render()[0].decode())
        async with running_node(settings, fresh_nats.url, database_url) as node, \
                httpx.AsyncClient(base_url=node.api_url) as client:

            async def delivered():
                return [r for r in await runs_of(engine, job) if r.delivery_status is DeliveryStatus.delivered]
            await until(delivered, 20, "a delivered run")

            after = await scrape(client)
            # the backlog's real values: test_consumer_backlog_is_exported_from_the_start_then_sampled
            for consumer in ("kjob-executor", "kjob-dispatcher"):
                assert ("kjob_consumer_pending", frozenset({("consumer", consumer)})) in after

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("kjob_runs_total", status="succeeded") >= 1
    assert grew("kjob_run_duration_seconds_count", status="succeeded") >= 1
    assert grew("kjob_runs_published_total", trigger="schedule", republish="false") >= 1
    assert grew("kjob_fire_lag_published_seconds_count") >= 1
    assert grew("kjob_fire_lag_started_seconds_count") >= 1
    # a healthy node fires well inside the histogram's last finite bucket
    assert grew("kjob_fire_lag_published_seconds_bucket", le="1.0") >= 1
    assert grew("kjob_delivery_attempts_total", result="delivered") >= 1
    assert value(after, "kjob_executor_slots", node="metrics-node") == settings.executor.concurrency
    assert ("kjob_executor_slots_in_use", frozenset({("node", "metrics-node")})) in after
    assert value(after, "kjob_consumer_redelivered", consumer="kjob-executor") >= 0


def test_a_fresh_node_exports_every_counter_at_zero():
    """Dashboards and `rate()` alerts need the series before the first failure, not after it."""
    fresh = metrics.Metrics()
    scrape = samples(fresh.render()[0].decode())
    for name, labels in [
        ("kjob_slots_missed_total", {"reason": "outside_catchup_window"}),
        ("kjob_slots_missed_total", {"reason": "overlap"}),
        ("kjob_attempts_lost_total", {}),
        ("kjob_attempts_retried_total", {}),
        ("kjob_delivery_failures_total", {"reason": "gave_up"}),
        ("kjob_delivery_failures_total", {"reason": "rejected"}),
        ("kjob_delivery_attempts_total", {"result": "unavailable"}),
        ("kjob_runs_total", {"status": "failed"}),
        ("kjob_runs_total", {"status": "missed"}),
        ("kjob_runs_published_total", {"trigger": "catchup", "republish": "true"}),
    ]:
        assert scrape.get((name, frozenset(labels.items()))) == 0.0, f"{name}{labels} is not exported at 0"


async def test_consumer_backlog_is_exported_from_the_start_then_sampled(fresh_nats):
    """The poller's series exist at 0 before its first round, then carry the real backlog."""
    import asyncio

    import nats

    from kjob.bus import names
    from kjob.bus.setup import BusSettings, ensure_consumer, ensure_streams

    previous = metrics.install(metrics.Metrics())
    nc = await nats.connect(fresh_nats.url)
    stop = asyncio.Event()
    try:
        js = nc.jetstream()
        await ensure_streams(js, 1)
        await ensure_consumer(js, names.RUNS_STREAM, names.EXECUTOR_CONSUMER, names.RUN_DUE_ALL, BusSettings())
        for n in range(3):
            await js.publish(names.run_due("backlog"), b"{}", headers={"Nats-Msg-Id": f"backlog-{n}"})
        poller = asyncio.create_task(metrics.poll_consumers(js, ["executor"], stop, 0.2))
        await asyncio.sleep(0)
        first = samples(metrics.render()[0].decode())
        assert value(first, "kjob_consumer_pending", consumer=names.EXECUTOR_CONSUMER) == 0.0
        assert ("kjob_consumer_pending", frozenset({("consumer", names.DISPATCHER_CONSUMER)})) not in first

        async def sampled():
            now = samples(metrics.render()[0].decode())
            return value(now, "kjob_consumer_pending", consumer=names.EXECUTOR_CONSUMER) == 3
        await until(sampled, 5, "the executor consumer's backlog of 3 on /metrics")
        stop.set()
        await poller
    finally:
        stop.set()
        await nc.close()
        metrics.install(previous)


def test_agent_usage_names_no_tenant_or_job_on_the_open_metrics_unless_the_operator_asks():
    """/metrics answers without a token: one tenant must not read another's job names or spend."""
    from types import SimpleNamespace

    usage = SimpleNamespace(tokens_in=120, tokens_out=30, cost_usd=0.25, turns=2)
    previous = metrics.install(metrics.Metrics())
    try:
        metrics.agent_usage("acme", "secret-project", "claude", usage)
        text = metrics.render()[0].decode()
        assert "acme" not in text and "secret-project" not in text
        scrape = samples(text)
        assert value(scrape, "kjob_agent_tokens_total", agent="claude", direction="input") == 120
        assert value(scrape, "kjob_agent_cost_usd_total", agent="claude") == 0.25

        metrics.install(metrics.Metrics())
        metrics.usage_by_job = True
        metrics.agent_usage("acme", "secret-project", "claude", usage)
        scrape = samples(metrics.render()[0].decode())
        assert value(scrape, "kjob_agent_turns_total", tenant="acme", job="secret-project", agent="claude") == 2
    finally:
        metrics.usage_by_job = False
        metrics.install(previous)
