"""The dispatcher: delivers each finished run's result to its channel, at least once.

For each result message: look the run up in the ledger; if its delivery is still pending, POST
the RFC body to Relay (or the webhook) with `Idempotency-Key: <run id>`. 2xx: delivered. 4xx:
the request is wrong, so the delivery is `failed` and not retried. Connection error, timeout
or 5xx: the message comes back after a backoff (`nak(delay)`), until `give_up_after_s` has passed
since the run finished. The agent is never run again for a delivery (invariant 2).
"""

from __future__ import annotations

import asyncio
import socket
import logging

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from kjob._time import utcnow
from kjob.bus import ack, names
from kjob.bus.messages import Event, EventKind, RunResult
from kjob.bus.publish import publish_event
from kjob.bus.consume import consume
from kjob.bus.setup import BusSettings, ensure_consumer
from kjob.config import DispatcherSettings
from kjob.dispatcher.relay import RelayClient
from kjob.errors import RelayRejected, RelayUnavailable
from kjob.model.policies import PAUSED_NOTICE, pause_alert, pause_note
from kjob.model.notify import decide
from kjob.model.run import DeliveryStatus, Run, RunStatus, dispatch_payload, run_page_url
from kjob.store.deliveries import DeliveryLedger
from kjob.store.usage import UsageStore
from kjob.telemetry import metrics, tracing

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self,
        *,
        nc: NATS,
        js: JetStreamContext,
        ledger: DeliveryLedger,
        relay: RelayClient,
        settings: DispatcherSettings,
        bus: BusSettings,
        log_url_base: str,
        node: str | None = None,
    ) -> None:
        self.nc, self.js, self.ledger, self.relay = nc, js, ledger, relay
        self.settings, self.bus = settings, bus
        self.log_url_base = log_url_base.rstrip("/")
        self.node = node or socket.gethostname()
        self.usage = UsageStore(ledger.engine)

    async def run(self, stop: asyncio.Event) -> None:
        sub = await ensure_consumer(self.js, names.RESULTS_STREAM, names.DISPATCHER_CONSUMER, names.RUN_RESULT_ALL, self.bus)
        await consume(sub, self._handle, concurrency=self.settings.concurrency, stop=stop, name="dispatcher")

    @tracing.handles_run("kjob deliver", names.DISPATCHER_CONSUMER)
    async def _handle(self, msg) -> None:
        try:
            result = RunResult.decode(msg.data)
        except ValueError:
            log.error("dispatcher: dropping a malformed result on %s", msg.subject)
            await ack.drop(msg)
            return
        tracing.annotate(tenant=result.tenant, job=result.slug, run_id=result.run_id, status=result.status,
                         attempt=result.attempt)
        if result.notice is not None:
            await self._notice(result, msg)
            return
        delivery = await self.ledger.claim_delivery(result.run_id, self.node, self.settings.timeout_s * 2 + 5)
        if delivery is None:
            current = await self.ledger.delivery(result.run_id)
            if current is not None and current.run.delivery_status is DeliveryStatus.pending:
                # Another dispatcher is delivering it right now; look again later rather than ack
                # a message it may still need to nak.
                await ack.later(msg, self.settings.retry_max_s)
            else:
                await ack.done(msg)  # deleted, already delivered, failed for good, or nothing to deliver
            return
        run = delivery.run
        # The agent's answer, not its raw output, when its adapter or result file gave one.
        answer = await self.usage.for_delivery(run.id, run.attempt, run.job_id)
        body = answer.answer if answer.answer is not None else (run.output_excerpt or "")
        # A run skipped at the cost cap is an alert: sent once a day per job, whatever the policy.
        alert = run.status is RunStatus.skipped and answer.answer is not None
        decision = decide(policy="on_change" if alert else answer.policy, quiet=answer.quiet,
                          succeeded=alert or run.status is RunStatus.succeeded,
                          answer=body, agent_notify=answer.notify, last_sent_hash=answer.last_sent_hash,
                          last_sent_run=answer.last_sent_run)
        if not decision.send:
            await self.ledger.mark_delivery(run.id, DeliveryStatus.suppressed, f"not sent: {decision.reason}")
            await self._event(run, "suppressed")
            await ack.done(msg)
            return
        payload = dispatch_payload(run.slug, delivery.channel, run.status, body,
                                   run_page_url(self.log_url_base, run.id))
        try:
            await self.relay.dispatch(delivery.channel, payload, run.id)
        except RelayRejected as err:
            metrics.delivery_attempt("rejected")
            metrics.delivery_failed("rejected")
            tracing.annotate(delivery=DeliveryStatus.failed.value)
            await self.ledger.mark_delivery(run.id, DeliveryStatus.failed, str(err))
            await self._event(run, "failed")
            await ack.done(msg)
            return
        except RelayUnavailable as err:
            metrics.delivery_attempt("unavailable")
            attempts = await self.ledger.count_delivery_attempt(run.id, str(err))
            now = utcnow()
            age = (now - (run.finished_at or now)).total_seconds()
            if age > self.settings.give_up_after_s:
                metrics.delivery_failed("gave_up")
                tracing.annotate(delivery=DeliveryStatus.failed.value)
                await self.ledger.mark_delivery(run.id, DeliveryStatus.failed, f"gave up after {attempts} attempts: {err}")
                await self._event(run, "failed")
                await ack.done(msg)
                return
            delay = min(self.settings.retry_initial_s * 2 ** (attempts - 1), self.settings.retry_max_s)
            log.info("dispatcher: run %s not delivered (%s); retry %d in %.1fs", run.id, err, attempts, delay)
            await ack.later(msg, delay)
            return
        metrics.delivery_attempt("delivered")
        tracing.annotate(delivery=DeliveryStatus.delivered.value)
        await self.ledger.mark_delivery(run.id, DeliveryStatus.delivered)
        await self._event(run, "delivered")
        await ack.done(msg)

    async def _notice(self, result: RunResult, msg) -> None:
        """A notice about the run's job: today `paused` (kjob.executor.policies), an alert to the
        job's channel. Sent with `Idempotency-Key: <run id>.<notice>` and retried like a result;
        the ledger keeps no delivery state for it."""
        delivery = await self.ledger.delivery(result.run_id)
        if result.notice != PAUSED_NOTICE or delivery is None or delivery.channel == "none":
            await ack.done(msg)  # an unknown notice (a newer node's), a deleted job, or nowhere to send it
            return
        failures = result.failures or 0
        log_url = run_page_url(self.log_url_base, result.run_id)
        payload = pause_alert(result.slug, delivery.channel, failures, pause_note(failures, result.run_id), log_url)
        try:
            await self.relay.dispatch(delivery.channel, payload, f"{result.run_id}.{result.notice}")
        except RelayRejected as err:
            log.warning("dispatcher: the %s alert of %s was refused (%s); not retried", result.notice, result.slug, err)
        except RelayUnavailable as err:
            age = (utcnow() - result.finished_at).total_seconds()
            if age <= self.settings.give_up_after_s:
                delay = min(self.settings.retry_initial_s * 2 ** (msg.metadata.num_delivered - 1), self.settings.retry_max_s)
                await ack.later(msg, delay)
                return
            log.warning("dispatcher: gave up on the %s alert of %s: %s", result.notice, result.slug, err)
        await ack.done(msg)

    async def _event(self, run: Run, detail: str) -> None:
        await publish_event(self.nc, Event.about_run(EventKind.run_dispatched, run, detail, utcnow()))
