"""OTLP export: on when OTEL_EXPORTER_OTLP_ENDPOINT is set (to a real HTTP server that
records what it receives), off otherwise."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from kjob.telemetry import metrics, tracing
from tests.support.relay import RecordingRelay

OTEL_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                  "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME",
                  "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_RESOURCE_ATTRIBUTES")


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    tracing.install(None)


def attributes_of(resource) -> dict[str, str]:
    return {a.key: a.value.string_value for a in resource.attributes}


async def test_spans_and_metrics_are_pushed_over_otlp_when_an_endpoint_is_set(otel_env):
    with RecordingRelay() as collector:
        otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
        provider = tracing.setup("node-a")
        assert provider is not None and tracing.enabled()
        with tracing.publishing("kjob.run.due.acme", run_id="run-1", tenant="acme", job="nightly",
                                slot=datetime(2026, 5, 15, 10, tzinfo=timezone.utc), trigger="schedule") as headers:
            assert headers["traceparent"].startswith(f"00-{tracing.trace_id_hex('run-1')}-")
        provider.force_flush()
        provider.shutdown()

        pushed = metrics.build("node-a")
        pushed.runs.add(1, {"status": "succeeded"})
        pushed.provider.force_flush()
        pushed.provider.shutdown()

        paths = [r.path for r in collector.requests]
        assert "/v1/traces" in paths and "/v1/metrics" in paths
        traces = ExportTraceServiceRequest.FromString(next(r.body for r in collector.requests if r.path == "/v1/traces"))
        [resource_spans] = traces.resource_spans
        resource = attributes_of(resource_spans.resource)
        assert (resource["service.name"], resource["service.instance.id"]) == ("kjob", "node-a")
        [span] = resource_spans.scope_spans[0].spans
        assert span.name == "kjob publish due"
        assert int.from_bytes(span.trace_id, "big") == tracing.trace_id_for("run-1")
        sent = ExportMetricsServiceRequest.FromString(next(r.body for r in collector.requests if r.path == "/v1/metrics"))
        names = {m.name for rm in sent.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
        assert "kjob.runs" in names


def test_without_an_endpoint_nothing_is_exported_and_spans_cost_nothing(otel_env):
    assert tracing.setup("node-a") is None and not tracing.enabled()
    assert metrics.build("node-a").readers == ()
    with tracing.publishing("kjob.run.due.acme", run_id="run-1", tenant="acme", job="nightly",
                            slot=datetime.now(timezone.utc), trigger="schedule") as headers:
        assert headers == {}
    assert tracing.headers() == {}


def test_otel_sdk_disabled_wins_over_an_endpoint(otel_env):
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    otel_env.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.setup("node-a") is None
    assert metrics.build("node-a").readers == ()
