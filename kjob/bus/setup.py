"""Connect to NATS and declare kjob's streams and consumers, idempotently, at every start.

Consumers are created with `add_consumer` and then bound: `pull_subscribe(durable=...)`
silently keeps an existing consumer's old config (DESIGN.md), so a changed `ack_wait` would
never take effect.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from kjob.bus import names

log = logging.getLogger(__name__)

#: Duplicate window of the runs stream. Dedup is only a first filter against a re-publish
#: racing the original: the ledger claim is what makes a run execute once (DESIGN.md).
DEDUP_WINDOW_S = 120.0


@dataclass(frozen=True)
class BusSettings:
    replicas: int = 1
    ack_wait_s: float = 30.0
    max_ack_pending: int = 20_000


def stream_configs(replicas: int) -> list[StreamConfig]:
    def work_queue(name: str, subject: str, description: str) -> StreamConfig:
        """A stream each message of which one consumer takes, de-duplicated by `Nats-Msg-Id`."""
        return StreamConfig(name=name, subjects=[subject], retention=RetentionPolicy.WORK_QUEUE,
                            duplicate_window=DEDUP_WINDOW_S, description=description,
                            storage=StorageType.FILE, num_replicas=replicas)

    def kept(name: str, subject: str, max_age_s: float, max_bytes: int, description: str) -> StreamConfig:
        """A stream for any reader, kept `max_age_s` or up to `max_bytes`, the oldest dropped first."""
        return StreamConfig(name=name, subjects=[subject], retention=RetentionPolicy.LIMITS, max_age=max_age_s,
                            max_bytes=max_bytes, discard=DiscardPolicy.OLD, description=description,
                            storage=StorageType.FILE, num_replicas=replicas)

    return [
        work_queue(names.RUNS_STREAM, names.RUN_DUE_ALL, "due runs: ticker -> executors"),
        work_queue(names.RESULTS_STREAM, names.RUN_RESULT_ALL, "finished runs: executors -> dispatchers"),
        kept(names.EVENTS_STREAM, names.EVENT_ALL, 7 * 86_400.0, 1 << 30, "job and run events for other services"),
        kept(names.LOGS_STREAM, names.LOG_ALL, 86_400.0, 2 << 30, "live agent output per run"),
    ]


def consumer_config(durable: str, filter_subject: str, bus: BusSettings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=bus.ack_wait_s,
        # Unlimited: a due run is naked with a delay for its retries, and a run must never be
        # dropped by the broker (the ledger decides when it is over).
        max_deliver=-1,
        max_ack_pending=bus.max_ack_pending,
        filter_subject=filter_subject,
        num_replicas=bus.replicas,
    )


async def connect(url: str, name: str) -> NATS:
    """A connection that keeps reconnecting forever: NATS restarts must not end a node.
    `url` may list several servers of a cluster, comma-separated."""
    return await nats.connect(
        [u.strip() for u in url.split(",") if u.strip()],  # a cluster: "nats://a:4222,nats://b:4222"
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
    )


async def ensure_streams(js: JetStreamContext, replicas: int) -> None:
    for cfg in stream_configs(replicas):
        try:
            await js.add_stream(cfg)
        except BadRequestError as err:
            # Exists with another config (e.g. replicas changed): reconcile, and say so.
            log.warning("stream %s exists with a different config (%s); updating it", cfg.name, err.description)
            await js.update_stream(cfg)


async def ensure_consumer(js: JetStreamContext, stream: str, durable: str, filter_subject: str, bus: BusSettings):
    """Create or update a durable pull consumer, then bind to it."""
    cfg = consumer_config(durable, filter_subject, bus)
    try:
        # The server treats a create of an existing durable as an update of its editable fields.
        await js.add_consumer(stream, cfg)
    except BadRequestError as err:
        log.warning("consumer %s on %s keeps its old config: %s", durable, stream, err.description)
    return await js.pull_subscribe_bind(durable=durable, stream=stream)


async def stream_info(js: JetStreamContext) -> dict[str, dict]:
    """Messages per stream and, for the work streams, their consumer's backlog, for `kjob status`."""
    consumers = {names.RUNS_STREAM: names.EXECUTOR_CONSUMER, names.RESULTS_STREAM: names.DISPATCHER_CONSUMER}
    out: dict[str, dict] = {}
    for cfg in stream_configs(1):
        try:
            info = await js.stream_info(cfg.name)
        except NotFoundError:
            out[cfg.name] = {"exists": False}
            continue
        entry: dict = {
            "exists": True,
            "messages": info.state.messages,
            "consumers": info.state.consumer_count,
            "replicas": info.config.num_replicas,
        }
        durable = consumers.get(cfg.name)
        if durable:
            try:
                c = await js.consumer_info(cfg.name, durable)
                entry["consumer"] = {"name": durable, "pending": c.num_pending, "ack_pending": c.num_ack_pending,
                                     "redelivered": c.num_redelivered}
            except NotFoundError:
                entry["consumer"] = {"name": durable, "exists": False}
        out[cfg.name] = entry
    return out
