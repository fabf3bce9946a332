"""Which nodes are alive and what they run: a KV bucket each node writes every few seconds.

A node's key expires with the bucket TTL when it stops writing, so `kjob status` lists exactly
the nodes that have been heard from recently.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, Callable

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError, NotFoundError

from kjob._time import utcnow
from kjob.bus import names
from kjob.bus.errors import BUS_ERRORS
from kjob._tasks import stopped_within

log = logging.getLogger(__name__)

EVERY_S = 3.0
TTL_S = 10.0


async def _bucket(js: JetStreamContext, replicas: int = 1, create: bool = True):
    try:
        return await js.key_value(names.NODES_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        if not create:
            return None
        return await js.create_key_value(KeyValueConfig(
            bucket=names.NODES_BUCKET, history=1, ttl=TTL_S, storage=StorageType.FILE, replicas=replicas,
            description="kjob nodes heard from recently",
        ))


async def announce(js: JetStreamContext, node: str, info: Callable[[], dict[str, Any]], stop: asyncio.Event,
                   replicas: int = 1) -> None:
    """Write this node's facts every EVERY_S seconds until `stop`; remove them on the way out."""
    started = utcnow().isoformat()
    kv = None
    announced = True  # so that the first failure is said
    while not stop.is_set():
        try:
            kv = kv or await _bucket(js, replicas)
            value = {"node": node, "started": started, "seen": utcnow().isoformat(), **info()}
            await kv.put(_key(node), json.dumps(value).encode())
            announced = True
        except BUS_ERRORS as err:
            # `kjob status` stops listing the node after a while: say why, once per outage.
            if announced:
                log.warning("presence: cannot announce %s (%r); trying again every %ss", node, err, EVERY_S)
            kv, announced = None, False
        await stopped_within(stop, EVERY_S)
    with contextlib.suppress(*BUS_ERRORS):  # NATS away at the stop: the entry ages out instead
        if kv is not None:
            await kv.delete(_key(node))


async def nodes(js: JetStreamContext) -> list[dict[str, Any]]:
    kv = await _bucket(js, create=False)
    if kv is None:
        return []
    try:
        keys = await kv.keys()
    except NoKeysError:
        return []
    out = []
    for key in keys:
        with contextlib.suppress(KeyNotFoundError, ValueError):  # gone meanwhile, or not ours
            entry = await kv.get(key)
            if entry.value:
                out.append(json.loads(entry.value))
    return sorted(out, key=lambda n: n["node"])


def _key(node: str) -> str:
    # KV keys allow [-/_=.a-zA-Z0-9]; node names are host names, but be safe.
    return "".join(c if c.isalnum() or c in "-_=" else "_" for c in node)
