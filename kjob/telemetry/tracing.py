"""Traces: one trace per run, from the ticker's publish to the dispatcher's delivery.

The spans of one run, and who makes them:

    kjob publish due      ticker (or the gateway's run-now, or the ticker's recovery)  PRODUCER
    └─ kjob claim         executor, parent taken from the due message's `traceparent`  CONSUMER
       └─ kjob sandbox    executor: the attempt, from the sandbox's start to its recorded end
          └─ kjob deliver dispatcher, parent taken from the result message's `traceparent`

Attributes: `kjob.tenant`, `kjob.job.slug`, `kjob.run.id`, `kjob.slot`, `kjob.run.trigger`,
`kjob.run.attempt`, `kjob.run.status`, plus the messaging semantic conventions
(`messaging.system`, `messaging.destination.name`, ...) on publish and consume spans.

**The trace id is derived from the run id** (`trace_id_for`: the first 16 bytes of SHA-256 of
it). A run is then one trace wherever it goes without storing anything: a retry is the same
due message redelivered, so its claim is another child of the same publish span; a republish
by the recovery loop, a run-now from the gateway, or a message that lost its headers starts a
span in the same trace, because every process computes the same id from the run id. Keeping
the context in the ledger would cost a column and a write per slot at 1,000 slots/s, and a
process that only has the run id (the recovery loop, a log line) could not find it. The hash
rather than the run UUID itself: a UUID's version and variant bits would bias the ratio
sampler (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`), which reads the low 64 bits.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set;
the other standard `OTEL_*` variables apply (service name, headers, sampler, resource
attributes). Off, every helper here returns at its first line: a no-op costs a function call.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from datetime import datetime
from typing import Any, Awaitable, Callable, Iterator, Mapping, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.semconv._incubating.attributes import (
    messaging_attributes as messaging,
)
from opentelemetry.semconv._incubating.attributes import process_attributes as process
from opentelemetry.semconv._incubating.attributes import (
    service_attributes as service_incubating,
)
from opentelemetry.semconv.attributes import service_attributes as service
from opentelemetry.trace import Link, SpanKind, Tracer

from kjob.bus import names
from kjob.telemetry import runcontext

log = logging.getLogger(__name__)

SCOPE = "kjob"
MESSAGING_SYSTEM = "nats"

#: `annotate` keyword -> span attribute.
ATTRIBUTES = {
    "tenant": "kjob.tenant",
    "job": "kjob.job.slug",
    "run_id": "kjob.run.id",
    "slot": "kjob.slot",
    "trigger": "kjob.run.trigger",
    "attempt": "kjob.run.attempt",
    "status": "kjob.run.status",
    "backend": "kjob.sandbox.backend",
    "exit_code": process.PROCESS_EXIT_CODE,
    "delivery": "kjob.delivery.status",
    "republish": "kjob.republish",
}

_provider: TracerProvider | None = None
_tracer: Tracer | None = None
#: The trace id the next root span gets (see RunIdGenerator).
_next_trace_id: ContextVar[int | None] = ContextVar("kjob_next_trace_id", default=None)
_NO_HEADERS: AbstractContextManager[dict[str, str]] = nullcontext({})

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def trace_id_for(run_id: str) -> int:
    """The trace id of a run: the same on every node, for every attempt and republish."""
    tid = int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:16], "big")
    return tid or 1  # zero is the invalid trace id; SHA-256 will not give it, but be exact


def trace_id_hex(run_id: str) -> str:
    """`trace_id_for` as tracing backends print it (32 hex digits): search for this."""
    return format(trace_id_for(run_id), "032x")


class RunIdGenerator(RandomIdGenerator):
    """Random ids, except a root span started for a run gets the run's trace id."""

    def generate_trace_id(self) -> int:
        chosen = _next_trace_id.get()
        return chosen if chosen is not None else super().generate_trace_id()


# -- set-up -------------------------------------------------------------------------------------


def make_resource(node: str | None = None) -> Resource:
    """Who emits: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES when set, else service `kjob`;
    the node name as `service.instance.id`."""
    resource = Resource.create({service_incubating.SERVICE_INSTANCE_ID: node or socket.gethostname()})
    if str(resource.attributes.get(service.SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({service.SERVICE_NAME: "kjob"}))
    return resource


def make_provider(node: str | None = None, **kwargs: Any) -> TracerProvider:
    """A TracerProvider that gives runs their trace ids; no exporter yet (add a span processor)."""
    return TracerProvider(resource=make_resource(node), id_generator=RunIdGenerator(), **kwargs)


def install(provider: TracerProvider | None) -> None:
    """Make `provider` the one kjob's spans go to; None turns tracing off. The global OTel
    provider is left alone, so a library's spans do not mix with the run traces."""
    global _provider, _tracer
    _provider = provider
    _tracer = provider.get_tracer(SCOPE) if provider is not None else None


def enabled() -> bool:
    return _tracer is not None


def provider() -> TracerProvider | None:
    return _provider


def otlp_configured(signal: str) -> bool:
    """Whether the standard OTel variables ask for OTLP export of `signal` ("traces" | "metrics")."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"))


def setup(node: str | None = None) -> TracerProvider | None:
    """Turn tracing on with OTLP/HTTP export if the environment asks for it (see the module
    docstring); leave it off otherwise. A provider already installed (a test's) is kept."""
    if _provider is not None or not otlp_configured("traces"):
        return _provider
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    tracer_provider = make_provider(node)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    install(tracer_provider)
    log.info("tracing: exporting spans over OTLP/HTTP to %s",
             os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    return tracer_provider


def instrument_app(app: Any) -> None:
    """A server span per gateway request (probes and /metrics excluded), when tracing is on."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=_provider, excluded_urls="/healthz$,/readyz$,/metrics$",
                                       exclude_spans=["receive", "send"])


# -- spans --------------------------------------------------------------------------------------


def _attributes(fields: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, datetime):
            value = value.isoformat()
        elif not isinstance(value, (str, bool, int, float)):
            value = str(value)
        out[ATTRIBUTES[key]] = value
    return out


def publishing(subject: str, *, run_id: str, tenant: str, job: str, slot: datetime, trigger: str,
               republish: bool = False) -> AbstractContextManager[dict[str, str]]:
    """Wrap the publish of a due run: yields the headers that carry the trace context (empty
    when tracing is off). The span is a root in the run's trace, linked to the span that is
    current (a gateway request doing a run-now), if any."""
    if _tracer is None:
        return _NO_HEADERS
    return _publishing(subject, run_id, _attributes({
        "run_id": run_id, "tenant": tenant, "job": job, "slot": slot, "trigger": trigger,
        "republish": republish or None}))


@contextmanager
def _publishing(subject: str, run_id: str, attributes: dict[str, Any]) -> Iterator[dict[str, str]]:
    assert _tracer is not None
    caller = trace.get_current_span().get_span_context()
    attributes.update({
        messaging.MESSAGING_SYSTEM: MESSAGING_SYSTEM,
        messaging.MESSAGING_DESTINATION_NAME: subject,
        messaging.MESSAGING_MESSAGE_ID: run_id,
        messaging.MESSAGING_OPERATION_TYPE: messaging.MessagingOperationTypeValues.SEND.value,
    })
    span = _run_span("kjob publish due", run_id, SpanKind.PRODUCER, attributes,
                      links=[Link(caller)] if caller.is_valid else None)
    with trace.use_span(span, end_on_exit=True):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        yield carrier


def _run_span(name: str, run_id: str, kind: SpanKind, attributes: dict[str, Any],
               parent: otel_context.Context | None = None, links: list[Link] | None = None) -> trace.Span:
    """A span that, when `parent` holds no span, is a root in the run's trace (RunIdGenerator)."""
    assert _tracer is not None
    token = _next_trace_id.set(trace_id_for(run_id))
    try:
        return _tracer.start_span(name, context=parent or otel_context.Context(), kind=kind,
                                  attributes=attributes, links=links)
    finally:
        _next_trace_id.reset(token)


def handles_run(name: str, consumer: str) -> Callable[[F], F]:
    """Decorate `async def _handle(self, msg)` of a JetStream consumer: the handler runs with
    the run's log fields bound (from the `Kjob-Run-Id` and `Kjob-Tenant` headers) and, when
    tracing is on, inside a CONSUMER span whose parent is the message's `traceparent` (or a
    root in the run's trace when it has none)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def handler(self: Any, msg: Any) -> Any:
            headers = msg.headers or {}
            run_id, tenant = headers.get(names.HDR_RUN_ID), headers.get(names.HDR_TENANT)
            runcontext.bind(run_id=run_id, tenant=tenant)  # the task is this message's alone
            if _tracer is None:
                return await fn(self, msg)
            attributes = _attributes({"run_id": run_id, "tenant": tenant})
            attributes.update({
                messaging.MESSAGING_SYSTEM: MESSAGING_SYSTEM,
                messaging.MESSAGING_DESTINATION_NAME: msg.subject,
                messaging.MESSAGING_CONSUMER_GROUP_NAME: consumer,
                messaging.MESSAGING_OPERATION_TYPE: messaging.MessagingOperationTypeValues.PROCESS.value,
            })
            parent = propagate.extract(headers)
            if run_id:
                span = _run_span(name, run_id, SpanKind.CONSUMER, attributes, parent=parent)
            else:
                span = _tracer.start_span(name, context=parent, kind=SpanKind.CONSUMER, attributes=attributes)
            with trace.use_span(span, end_on_exit=True):
                return await fn(self, msg)

        return handler  # type: ignore[return-value]

    return wrap


def span(name: str) -> Callable[[F], F]:
    """Decorate an async function to run inside a child span of the current one (when on)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def traced(*args: Any, **kwargs: Any) -> Any:
            if _tracer is None:
                return await fn(*args, **kwargs)
            with _tracer.start_as_current_span(name):
                return await fn(*args, **kwargs)

        return traced  # type: ignore[return-value]

    return wrap


def annotate(*, tenant: str | None = None, job: str | None = None, run_id: str | None = None,
             slot: datetime | None = None, trigger: str | None = None, attempt: int | None = None,
             status: str | None = None, backend: str | None = None, exit_code: int | None = None,
             delivery: str | None = None) -> None:
    """Say more about the run being handled: on the current span (when tracing is on) and, for
    tenant, job and run id, on the log lines that follow in this task."""
    if tenant is not None or job is not None or run_id is not None:
        runcontext.bind(tenant=tenant, job=job, run_id=run_id)
    if _tracer is None:
        return
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes(_attributes({
            "tenant": tenant, "job": job, "run_id": run_id, "slot": slot, "trigger": trigger, "attempt": attempt,
            "status": status, "backend": backend, "exit_code": exit_code, "delivery": delivery}))


def headers() -> dict[str, str]:
    """The W3C trace context of the current span, to add to a message's headers ({} when off)."""
    if _tracer is None:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def current_ids() -> tuple[str | None, str | None]:
    """(trace id, span id) of the current span in hex, or (None, None) without one."""
    if _tracer is None:
        return None, None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
