"""Metrics: recorded once through OpenTelemetry, read two ways.

- `GET /metrics` on the API (Prometheus text format) reads them through the OTel Prometheus
  reader, on a registry of kjob's own;
- OTLP/HTTP push, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._METRICS_ENDPOINT`) is set, every
  `OTEL_METRIC_EXPORT_INTERVAL` ms (60 s by default).

The roles call the functions at the bottom of this module (`run_published`, `run_claimed`,
`attempt_finished`, ...); they act on one process-wide `Metrics`, built on first use (or by
`setup`, which decides about OTLP). The names as Prometheus shows them are in `EXPORTED`, and
the dashboards and alert rules in deploy/ may use only those (tests/telemetry checks it).

No label names a tenant, a job or a run: /metrics is served without a token, and the number of
series must not grow with the number of jobs. Per-run detail is in the ledger, the logs and
the traces. The one exception is the operator's choice: `metrics_usage_by_job` labels the agent
usage metrics with tenant and job, for a /metrics no tenant can reach.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import datetime
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable, Sequence

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kjob._time import utcnow
from kjob.bus import names
from kjob.model.run import FINAL_STATUSES, MissReason, Trigger
from kjob.telemetry.tracing import make_resource, otlp_configured
from kjob._tasks import stopped_within

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from kjob.model.run import Run

log = logging.getLogger(__name__)

#: Seconds; fire lag targets are 10 ms (publish) and 250 ms (start), so the buckets are fine there.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)

#: Every metric family kjob exports, as Prometheus names it (OTel name, unit -> suffix).
EXPORTED: dict[str, str] = {
    "kjob_agent_tokens_total": "model tokens agents reported, by agent and direction (input|output)",
    "kjob_agent_cost_usd_total": "USD agents reported (or kjob priced from tokens), by agent",
    "kjob_agent_turns_total": "model turns agents reported, by agent",
    "kjob_runs_total": "runs that reached a final status, by status",
    "kjob_run_duration_seconds": "last attempt's start to the run's end, by status (histogram)",
    "kjob_attempts_retried_total": "attempts that failed and will be retried",
    "kjob_attempts_lost_total": "attempts lost with their executor, found when the run was claimed again",
    "kjob_runs_published_total": "due messages published, by trigger and whether a republish",
    "kjob_fire_lag_published_seconds": "slot -> due message published, scheduled slots (histogram)",
    "kjob_fire_lag_started_seconds": "slot -> claimed by an executor, first attempts of scheduled slots (histogram)",
    "kjob_slots_missed_total": "slots that will not run, by reason",
    "kjob_ticker_jobs_skipped_total": "times the ticker left a job out because its stored row or schedule failed, by reason",
    "kjob_delivery_attempts_total": "POSTs to Relay or a webhook, by result: delivered | rejected | unavailable",
    "kjob_delivery_failures_total": "deliveries given up for good, by reason: rejected | gave_up",
    "kjob_ticker_leader": "1 on the node whose ticker leads, else 0",
    "kjob_ticker_leader_changes_total": "times this node became the ticker leader",
    "kjob_executor_slots_in_use": "runs in flight on this node's executor",
    "kjob_executor_slots": "this node's executor capacity",
    "kjob_executor_warm_starts_total": "sandboxes built ahead for look-ahead runs, by result: used (the claim "
                                       "opened the gate) | closed (ended with the agent unstarted)",
    "kjob_consumer_pending": "messages not yet delivered to the consumer",
    "kjob_consumer_ack_pending": "messages delivered and not yet acked",
    "kjob_consumer_redelivered": "messages delivered more than once and not yet acked",
}

#: The JetStream consumer each role reads, as (stream, durable).
CONSUMERS = {
    "executor": (names.RUNS_STREAM, names.EXECUTOR_CONSUMER),
    "dispatcher": (names.RESULTS_STREAM, names.DISPATCHER_CONSUMER),
}

#: Reasons for `slots_missed`, each stated in kjob.model.run.MissReason.
MISSED_REASONS = tuple(reason.value for reason in MissReason)
#: Results of `delivery_attempt` and reasons of `delivery_failed`.
DELIVERY_RESULTS = ("delivered", "rejected", "unavailable")
DELIVERY_FAILURES = ("rejected", "gave_up")
#: Results of `warm_start`.
WARM_RESULTS = ("used", "closed")
#: Reasons of `job_skipped`: the job's stored row does not read, or its slots cannot be computed.
JOB_SKIP_REASONS = ("unreadable", "schedule")


class Metrics:
    """kjob's instruments on one MeterProvider, readable as Prometheus text from `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None, readers: Sequence[MetricReader] = (),
                 node: str | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        prometheus = PrometheusMetricReader(registry=self.registry, disable_target_info=True, scope_info_enabled=False)
        #: Readers besides Prometheus (the OTLP push, when configured).
        self.readers = tuple(readers)
        self.provider = MeterProvider(metric_readers=[prometheus, *readers], resource=make_resource(node))
        meter = self.provider.get_meter("kjob")

        # Each instrument's description is looked up by the name Prometheus gives it (dots to
        # underscores, `_total` on counters, `_seconds` for the unit s), so EXPORTED is the one
        # place that spells it.
        def counter(name: str, unit: str):
            return meter.create_counter(name, unit, EXPORTED[f"{_prometheus(name)}_total"])

        def gauge(name: str, unit: str):
            return meter.create_gauge(name, unit, EXPORTED[_prometheus(name)])

        def seconds(name: str, buckets: Sequence[float]):
            return meter.create_histogram(name, "s", EXPORTED[f"{_prometheus(name)}_seconds"],
                                          explicit_bucket_boundaries_advisory=buckets)

        self.runs = counter("kjob.runs", "{run}")
        self.duration = seconds("kjob.run.duration", DURATION_BUCKETS)
        self.retried = counter("kjob.attempts.retried", "{attempt}")
        self.lost = counter("kjob.attempts.lost", "{attempt}")
        self.published = counter("kjob.runs.published", "{message}")
        self.lag_published = seconds("kjob.fire_lag.published", LAG_BUCKETS)
        self.lag_started = seconds("kjob.fire_lag.started", LAG_BUCKETS)
        self.missed = counter("kjob.slots.missed", "{slot}")
        self.jobs_skipped = counter("kjob.ticker.jobs_skipped", "{job}")
        self.delivery = counter("kjob.delivery.attempts", "{request}")
        self.delivery_failed = counter("kjob.delivery.failures", "{run}")
        self.agent_tokens = counter("kjob.agent.tokens", "{token}")
        self.agent_cost = counter("kjob.agent.cost_usd", "{USD}")
        self.agent_turns = counter("kjob.agent.turns", "{turn}")
        self.leader = gauge("kjob.ticker.leader", "1")
        self.leader_changes = counter("kjob.ticker.leader_changes", "{change}")
        self.pending = gauge("kjob.consumer.pending", "{message}")
        self.ack_pending = gauge("kjob.consumer.ack_pending", "{message}")
        self.redelivered = gauge("kjob.consumer.redelivered", "{message}")
        self.warm_starts = counter("kjob.executor.warm_starts", "{sandbox}")
        # Read when collected, so a scrape sees the executor as it is, not as last sampled.
        self._executors: dict[int, tuple[str, Callable[[], int], int]] = {}
        self._lock = threading.Lock()
        for name, observe in (("kjob.executor.slots_in_use", self._observe_in_use),
                              ("kjob.executor.slots", self._observe_capacity)):
            meter.create_observable_gauge(name, [observe], "{run}", EXPORTED[_prometheus(name)])
        self._start_at_zero()

    def _start_at_zero(self) -> None:
        """Export every counter series a node can produce at 0 from the start: a series that
        first appears with its first event shows "No data" in the dashboards until then, and
        `rate()` or `increase()` alerts cannot fire on the first increment."""
        for status in sorted(s.value for s in FINAL_STATUSES):
            self.runs.add(0, {"status": status})
        for trigger in Trigger:
            for republish in (False, True):
                self.published.add(0, {"trigger": trigger.value, "republish": republish})
        for reason in MISSED_REASONS:
            self.missed.add(0, {"reason": reason})
        for result in DELIVERY_RESULTS:
            self.delivery.add(0, {"result": result})
        for reason in DELIVERY_FAILURES:
            self.delivery_failed.add(0, {"reason": reason})
        for reason in JOB_SKIP_REASONS:
            self.jobs_skipped.add(0, {"reason": reason})
        for result in WARM_RESULTS:
            self.warm_starts.add(0, {"result": result})
        self.retried.add(0)
        self.lost.add(0)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def watch_executor(self, node: str, in_use: Callable[[], int], capacity: int) -> Callable[[], Awaitable[None]]:
        """Report an executor's slots; returns the async function that stops reporting them
        (a node's closer)."""
        key = id(in_use)
        with self._lock:
            self._executors[key] = (node, in_use, capacity)

        async def forget() -> None:
            with self._lock:
                self._executors.pop(key, None)

        return forget

    def _watched(self) -> list[tuple[str, Callable[[], int], int]]:
        with self._lock:
            return list(self._executors.values())

    def _observe_in_use(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(in_use(), {"node": node}) for node, in_use, _ in self._watched()]

    def _observe_capacity(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(capacity, {"node": node}) for node, _, capacity in self._watched()]


_metrics: Metrics | None = None
_setup_lock = threading.Lock()


def build(node: str | None = None) -> Metrics:
    """A Metrics with OTLP/HTTP export if the environment asks for it (see the module docstring)."""
    readers: list[MetricReader] = []
    if otlp_configured("metrics"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter,
        )
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    return Metrics(readers=readers, node=node)


def setup(node: str | None = None) -> Metrics:
    """Build the process's Metrics (`build`). Call before anything is recorded: a second call
    returns the first one's."""
    global _metrics
    with _setup_lock:
        if _metrics is None:
            _metrics = build(node)
        return _metrics


def install(metrics: Metrics | None) -> Metrics | None:
    """Make `metrics` the process's (None: build it again on next use); returns the one before.
    For tests that need a registry of their own."""
    global _metrics
    with _setup_lock:
        previous, _metrics = _metrics, metrics
        return previous


def get() -> Metrics:
    """The process's Metrics (built without OTLP if `setup` was not called)."""
    return _metrics if _metrics is not None else setup()


def render() -> tuple[bytes, str]:
    return get().render()


def _prometheus(name: str) -> str:
    """An instrument's name as the Prometheus exporter writes it, before any suffix."""
    return name.replace(".", "_")


def _since(moment: datetime) -> float:
    return (utcnow() - moment).total_seconds()


# -- what the roles call ------------------------------------------------------------------------


def run_published(slot: datetime, trigger: str, republish: bool = False) -> None:
    """Ticker (and run-now): a due message is out. Fire lag only for a scheduled slot's first
    publish: a catch-up or manual run is late by design, a republish by recovery."""
    m = get()
    m.published.add(1, {"trigger": trigger, "republish": republish})
    if trigger == "schedule" and not republish:
        m.lag_published.record(max(_since(slot), 0.0))


def run_claimed(run: "Run", previous_lost: bool = False) -> None:
    """Executor: it now runs `run` (attempt `run.attempt`)."""
    m = get()
    if previous_lost:
        m.lost.add(1)
    if run.trigger.value == "schedule" and run.attempt == 1:
        m.lag_started.record(max(_since(run.slot), 0.0))


def attempt_finished(run: "Run") -> None:
    """Executor: an attempt's end is recorded; `run` as the ledger has it now (`retrying`, or final)."""
    m = get()
    if not run.status.final:
        m.retried.add(1)
        return
    m.runs.add(1, {"status": run.status.value})
    duration = run.duration()
    if duration is not None:
        m.duration.record(max(duration, 0.0), {"status": run.status.value})


#: Set by the node from `Settings.metrics_usage_by_job`.
usage_by_job = False


def agent_usage(tenant: str, job: str, agent: str, usage) -> None:
    """Executor: what one attempt's agent reported (kjob.model.agent_report.Usage); by agent,
    and by tenant and job only where the operator said so (`usage_by_job`)."""
    m = get()
    labels = {"tenant": tenant, "job": job, "agent": agent} if usage_by_job else {"agent": agent}
    for direction, count in (("input", usage.tokens_in), ("output", usage.tokens_out)):
        if count:
            m.agent_tokens.add(count, {**labels, "direction": direction})
    if usage.cost_usd:
        m.agent_cost.add(usage.cost_usd, labels)
    if usage.turns:
        m.agent_turns.add(usage.turns, labels)


def slots_missed(reason: MissReason | str, count: int = 1) -> None:
    """Slots recorded as missed or skipped, for `reason` (a MissReason or its value)."""
    if count:
        get().missed.add(count, {"reason": str(reason)})  # the label is the value, not the member


def job_skipped(reason: str) -> None:
    """Ticker: a job left out (not scheduled, or its downtime not settled); `reason` is
    `unreadable` (its stored row) or `schedule` (computing its slots failed)."""
    get().jobs_skipped.add(1, {"reason": reason})


def warm_start(result: str) -> None:
    """Executor: a sandbox built ahead was `used` (its gate opened) or `closed` unstarted."""
    get().warm_starts.add(1, {"result": result})


def delivery_attempt(result: str) -> None:
    """Dispatcher: one POST; `result` is delivered | rejected | unavailable."""
    get().delivery.add(1, {"result": result})


def delivery_failed(reason: str) -> None:
    """Dispatcher: a delivery given up for good; `reason` is rejected | gave_up."""
    get().delivery_failed.add(1, {"reason": reason})


def leader_changed(node: str, leading: bool) -> None:
    """Ticker election: `node` became the leader (True) or stopped leading (False)."""
    m = get()
    m.leader.set(1 if leading else 0, {"node": node})
    if leading:
        m.leader_changes.add(1, {"node": node})


def watch_executor(node: str, in_use: Callable[[], int], capacity: int) -> Callable[[], Awaitable[None]]:
    """Node: report an executor's slots in use and capacity; returns the async function to stop."""
    return get().watch_executor(node, in_use, capacity)


def consumer_state(consumer: str, pending: int, ack_pending: int, redelivered: int) -> None:
    m = get()
    attrs = {"consumer": consumer}
    m.pending.set(pending, attrs)
    m.ack_pending.set(ack_pending, attrs)
    m.redelivered.set(redelivered, attrs)


async def poll_consumers(js: "JetStreamContext", roles: Iterable[str], stop: asyncio.Event, interval_s: float) -> None:
    """Node: sample the backlog of the consumers of its `roles` (executor, dispatcher) every
    `interval_s` until `stop`. A consumer that cannot be read (NATS away) is skipped until the
    next round, with one warning until it can be read again."""
    consumers = [CONSUMERS[role] for role in roles if role in CONSUMERS]
    failing: set[str] = set()
    for _, durable in consumers:  # a series from the start (see Metrics._start_at_zero)
        consumer_state(durable, 0, 0, 0)
    # Wait first: the roles create their consumers as they start.
    while not await stopped_within(stop, interval_s):
        for stream, durable in consumers:
            try:
                info = await js.consumer_info(stream, durable)
            except Exception as err:  # NATS reconnecting, or the role not up yet: next round
                if durable not in failing:
                    log.warning("metrics: cannot read consumer %s on %s (%s); its backlog is not reported",
                                durable, stream, err)
                    failing.add(durable)
                continue
            failing.discard(durable)
            consumer_state(durable, info.num_pending or 0, info.num_ack_pending or 0, info.num_redelivered or 0)

