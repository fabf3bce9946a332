"""The dispatcher: delivers each finished run's result to its channel, at least once.

For each result message: look the run up in the ledger; if its delivery is still pending, POST
the RFC body to Relay (or the webhook) with `Idempotency-Key: <run id>`. 2xx: delivered. 4xx:
the request is wrong, so the delivery is `failed` and not retried. Connection error, timeout
or 5xx: the message comes back after a backoff (`nak(delay)`), until `give_up_after_s` has passed
since the run finished. The agent is never run again for a delivery (invariant 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timezone

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import FetchTimeoutError

from kjob.bus import names
from kjob.bus.messages import Event, RunResult
from kjob.bus.setup import BusSettings, ensure_consumer
from kjob.config import DispatcherSettings
from kjob.dispatcher.relay import RelayClient
from kjob.errors import RelayRejected, RelayUnavailable
from kjob.model.run import DeliveryStatus, dispatch_payload
from kjob.store.runs import RunLedger

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self,
        *,
        nc: NATS,
        js: JetStreamContext,
        ledger: RunLedger,
        relay: RelayClient,
        settings: DispatcherSettings,
        bus: BusSettings,
        log_url_base: str,
    ) -> None:
        self.nc, self.js, self.ledger, self.relay = nc, js, ledger, relay
        self.settings, self.bus = settings, bus
        self.log_url_base = log_url_base.rstrip("/")
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._tasks: set[asyncio.Task] = set()

    async def run(self, stop: asyncio.Event) -> None:
        sub = await ensure_consumer(self.js, names.RESULTS_STREAM, names.DISPATCHER_CONSUMER, names.RUN_RESULT_ALL, self.bus)
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(batch=self.settings.concurrency, timeout=1.0)
                except (FetchTimeoutError, asyncio.TimeoutError):
                    continue
                except Exception as err:
                    log.warning("dispatcher: fetch failed (%s); retrying", err)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    await self._slots.acquire()
                    task = asyncio.create_task(self._handle(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("dispatcher: handler crashed", exc_info=task.exception())

    async def _handle(self, msg) -> None:
        try:
            result = RunResult.decode(msg.data)
        except ValueError:
            log.error("dispatcher: dropping a malformed result on %s", msg.subject)
            await msg.term()
            return
        delivery = await self.ledger.delivery(result.run_id)
        if delivery is None or delivery.run.delivery_status is not DeliveryStatus.pending:
            await msg.ack()  # deleted, already delivered, failed for good, or nothing to deliver
            return
        run = delivery.run
        payload = dispatch_payload(run.slug, delivery.channel, run.status, run.output_excerpt or "",
                                   f"{self.log_url_base}/v1/runs/{run.id}/logs")
        try:
            await self.relay.dispatch(delivery.channel, payload, run.id)
        except RelayRejected as err:
            await self.ledger.mark_delivery(run.id, DeliveryStatus.failed, str(err))
            await self._event(run.tenant, run, "failed")
            await msg.ack()
            return
        except RelayUnavailable as err:
            attempts = await self.ledger.count_delivery_attempt(run.id, str(err))
            age = (datetime.now(timezone.utc) - (run.finished_at or datetime.now(timezone.utc))).total_seconds()
            if age > self.settings.give_up_after_s:
                await self.ledger.mark_delivery(run.id, DeliveryStatus.failed, f"gave up after {attempts} attempts: {err}")
                await self._event(run.tenant, run, "failed")
                await msg.ack()
                return
            delay = min(self.settings.retry_initial_s * 2 ** (attempts - 1), self.settings.retry_max_s)
            log.info("dispatcher: run %s not delivered (%s); retry %d in %.1fs", run.id, err, attempts, delay)
            await msg.nak(delay=delay)
            return
        await self.ledger.mark_delivery(run.id, DeliveryStatus.delivered)
        await self._event(run.tenant, run, "delivered")
        await msg.ack()

    async def _event(self, tenant: str, run, detail: str) -> None:
        event = Event(kind="run_dispatched", tenant=tenant, job_id=run.job_id, slug=run.slug, run_id=run.id,
                      detail=detail, at=datetime.now(timezone.utc))
        with contextlib.suppress(Exception):
            await self.nc.publish(names.event(tenant, "run_dispatched"), event.encode(),
                                  headers={names.HDR_RUN_ID: run.id, names.HDR_TENANT: tenant})
