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
        # Metrics are the process's: earlier tests may have counted runs, so compare with now,
        # and mark the consumer gauges so a value from this node's poller can be told apart.
        for consumer in ("kjob-executor", "kjob-dispatcher"):
            metrics.consumer_state(consumer, -1, -1, -1)
        before = samples(metrics.render()[0].decode())
        async with running_node(settings, fresh_nats.url, database_url) as node, \
                httpx.AsyncClient(base_url=node.api_url) as client:

            async def delivered():
                return [r for r in await runs_of(engine, job) if r.delivery_status is DeliveryStatus.delivered]
            await until(delivered, 20, "a delivered run")

            async def consumers_sampled():
                now = await scrape(client)
                polled = all(value(now, "kjob_consumer_pending", consumer=c) >= 0
                             for c in ("kjob-executor", "kjob-dispatcher"))
                return polled and now
            after = await until(consumers_sampled, 5, "both consumers' backlog sampled on /metrics")

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
