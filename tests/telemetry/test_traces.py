"""One run is one trace, from the ticker's publish to the dispatcher's delivery, on a real
node (ticker, executor with the process sandbox, dispatcher, API) over real NATS and PostgreSQL."""

from __future__ import annotations

import httpx
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from kjob.model.run import DeliveryStatus, RunStatus
from kjob.store.tokens import TokenStore
from kjob.telemetry import tracing
from tests.support.pipeline import (
    create_job,
    fast_settings,
    running_node,
    runs_of,
    until,
)
from tests.support.relay import RecordingRelay


def trace_of(spans, run_id: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.context.trace_id == tracing.trace_id_for(run_id)]


def named(trace: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return sorted((s for s in trace if s.name == name), key=lambda s: s.start_time)


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_a_scheduled_run_is_one_connected_trace_from_ticker_to_delivery(
        tmp_path, fresh_nats, database_url, engine, spans):
    with RecordingRelay() as relay:
        settings = fast_settings(tmp_path, relay_url=relay.url)
        job = await create_job(engine, slug="traced", prompt="echo traced", output={"channel": "kode-chat:ops"})
        async with running_node(settings, fresh_nats.url, database_url) as node:
            async def first_delivered():
                return next((r for r in await runs_of(engine, job)
                             if r.delivery_status is DeliveryStatus.delivered), None)
            run = await until(first_delivered, 20, "a delivered run")

            async def delivery_span_ended():
                return named(trace_of(spans, run.id), "kjob deliver")
            await until(delivery_span_ended, 5, "the delivery span of the run")
            async with httpx.AsyncClient(base_url=node.api_url) as client:
                assert (await client.get("/v1/jobs")).status_code == 401
                assert (await client.get("/metrics")).status_code == 200

    trace = trace_of(spans, run.id)
    [publish] = named(trace, "kjob publish due")
    [claim] = named(trace, "kjob claim")
    [sandbox] = named(trace, "kjob sandbox")
    [deliver] = named(trace, "kjob deliver")
    # one chain: publish -> claim -> sandbox -> delivery, carried across NATS by `traceparent`
    assert publish.parent is None and publish.kind is SpanKind.PRODUCER
    assert parent_of(claim) == publish.context.span_id and claim.kind is SpanKind.CONSUMER
    assert parent_of(sandbox) == claim.context.span_id
    assert parent_of(deliver) == sandbox.context.span_id and deliver.kind is SpanKind.CONSUMER
    assert publish.start_time <= claim.start_time <= sandbox.start_time <= sandbox.end_time <= deliver.start_time

    for span in (publish, claim, deliver):
        assert span.attributes["kjob.tenant"] == "default"
        assert span.attributes["kjob.job.slug"] == "traced"
        assert span.attributes["kjob.run.id"] == run.id
        assert span.attributes["messaging.system"] == "nats"
    assert publish.attributes["kjob.slot"] == run.slot.isoformat()
    assert publish.attributes["messaging.destination.name"] == "kjob.run.due.default"
    assert claim.attributes["kjob.run.attempt"] == 1
    assert sandbox.attributes["kjob.sandbox.backend"] == "process"
    assert sandbox.attributes["kjob.run.status"] == "succeeded"
    assert sandbox.attributes["process.exit.code"] == 0
    assert deliver.attributes["kjob.delivery.status"] == "delivered"

    # the gateway: a server span per request, none for the scraper
    served = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert [(s.name, s.attributes.get("http.status_code")) for s in served] == [("GET /v1/jobs", 401)]


async def test_run_now_and_its_retry_stay_in_the_runs_trace_linked_to_the_request(
        tmp_path, fresh_nats, database_url, engine, spans):
    settings = fast_settings(tmp_path)
    job = await create_job(engine, slug="flaky", prompt="exit 1", schedule="@every 1h",
                           retries={"max": 1, "backoff": "fixed", "initial_delay": "200ms"})
    _, secret = await TokenStore(engine).create("default", "admin", "test")
    async with running_node(settings, fresh_nats.url, database_url) as node:
        async with httpx.AsyncClient(base_url=node.api_url, headers={"Authorization": f"Bearer {secret}"}) as client:
            answer = await client.post("/v1/jobs/flaky/run")
        assert answer.status_code == 202, answer.text
        run_id = answer.json()["id"]

        async def failed_for_good():
            [run] = await runs_of(engine, job)
            return run.status is RunStatus.failed and len(named(trace_of(spans, run_id), "kjob sandbox")) == 2
        await until(failed_for_good, 20, "two attempts, the run failed")

    trace = trace_of(spans, run_id)
    [publish] = named(trace, "kjob publish due")
    claims = named(trace, "kjob claim")
    attempts = named(trace, "kjob sandbox")
    # the retry is the same message redelivered: both claims hang off the one publish
    assert [parent_of(c) for c in claims] == [publish.context.span_id] * 2
    assert [parent_of(a) for a in attempts] == [c.context.span_id for c in claims]
    assert [a.attributes["kjob.run.attempt"] for a in attempts] == [1, 2]
    assert [a.attributes["kjob.run.status"] for a in attempts] == ["retrying", "failed"]
    assert publish.attributes["kjob.run.trigger"] == "manual"
    # the request that asked for it is linked, not the parent: the run's trace is its own
    [request] = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert request.name == "POST /v1/jobs/{slug}/run"
    assert [link.context.span_id for link in publish.links] == [request.context.span_id]
    assert request.context.trace_id != publish.context.trace_id
