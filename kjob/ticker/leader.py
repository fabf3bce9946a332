"""Ticker leadership: one ticker in the cluster fires slots; the others stand by.

The lease is a key in a JetStream KV bucket whose TTL is the lease time:

- campaign: `kv.create(key)` succeeds only while nobody holds the lease (the key is absent or
  expired). Standbys retry every `renew_s`; the first to succeed leads. A standby that watched
  the renewals takes the key over once a TTL has passed since the last one it saw, with an
  update conditional on that renewal's revision: nats-server expires the key 80 - 320 ms
  after its TTL (measured), and that wait was a fifth of every failover. The condition makes
  it as safe as the expiry: a renewal since, by anyone, fails it.
- renew: `kv.update(key, last=revision)` every `renew_s`. It fails if anyone else wrote the key
  since: the revision is a fencing token.
- step down: the leader stops firing at a *local monotonic* deadline (last successful renewal
  started + TTL - margin), before the key can expire and a successor be elected, whether or
  not it can still reach NATS. A paused process (SIGSTOP) wakes up past its deadline and stops.
- fence in the ledger: on election the revision is written to `ticker_lease`; the ticker's
  ledger writes carry it and succeed only while it is still there (kjob/store/slots.py).

The bucket TTL is used, not per-key TTLs: nats-py mis-handles the server's per-key TTL markers
(DESIGN.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from kjob.bus import names
from kjob.telemetry import metrics
from kjob._tasks import stopped_within

log = logging.getLogger(__name__)

#: A standby tries this long after the lease's expiry it computed: the server's own expiry
#: of the key and the delivery of the last renewal to the standby differ by about a ms.
EXPIRY_SLACK_S = 0.01


@dataclass
class LeaseInfo:
    node: str
    revision: int
    since: str
    renewed: str


class Leadership:
    """Campaign for, hold and renew the ticker lease of one node."""

    def __init__(self, js: JetStreamContext, node: str, *, ttl_s: float, renew_s: float, replicas: int = 1) -> None:
        if renew_s * 2 >= ttl_s:
            raise ValueError("the lease must be renewed at least twice per TTL")
        self.js, self.node, self.ttl_s, self.renew_s, self.replicas = js, node, ttl_s, renew_s, replicas
        #: Stop firing this long before the lease could expire: covers clock-rate drift between
        #: hosts and the time a publish in flight needs.
        self.margin_s = min(0.5, ttl_s / 4)
        #: The key's latest revision (renewals advance it).
        self.revision: int | None = None
        #: The revision this node was elected with: the fencing token of its term.
        self.term: int | None = None
        self._deadline = 0.0
        #: When a renewal of another node's lease last arrived (monotonic), while standing by,
        #: and its revision (None: the key was deleted, or none seen yet).
        self._renewed_seen: float | None = None
        self._seen_revision: int | None = None
        self._since = ""
        self._kv = None

    # -- what the ticker asks -----------------------------------------------------------------

    def valid(self) -> bool:
        """Whether this node may fire now: it leads and its local deadline has not passed."""
        return self.term is not None and time.monotonic() < self._deadline

    def fence(self) -> int:
        return self.term or 0

    # -- the protocol ---------------------------------------------------------------------------

    async def bucket(self):
        if self._kv is None:
            try:
                self._kv = await self.js.key_value(names.LEADER_BUCKET)
            except (BucketNotFoundError, NotFoundError):
                self._kv = await self.js.create_key_value(KeyValueConfig(
                    bucket=names.LEADER_BUCKET, history=1, ttl=self.ttl_s,
                    storage=StorageType.FILE, replicas=self.replicas,
                    description="kjob ticker leadership lease",
                ))
        return self._kv

    def _value(self) -> bytes:
        now = datetime.now(timezone.utc).isoformat()
        return json.dumps({"node": self.node, "since": self._since or now, "renewed": now}).encode()

    async def campaign(self, stop: asyncio.Event) -> bool:
        """Wait until this node holds the lease (True) or `stop` is set (False).

        While another node leads, this one watches the lease's renewals and tries again just
        after the lease would expire if no renewal came (the key expires a TTL after the
        last one), and at least every `renew_s`: a leader's death is noticed within a few
        ms of the expiry, not up to `renew_s` later."""
        watcher: asyncio.Task | None = None
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    kv = await self.bucket()
                    self._since = datetime.now(timezone.utc).isoformat()
                    self.revision = self.term = await self._claim(kv)
                    self._deadline = started + self.ttl_s - self.margin_s
                    log.info("ticker: %s elected leader (revision %d)", self.node, self.revision)
                    metrics.leader_changed(self.node, True)
                    return True
                except KeyWrongLastSequenceError:  # someone leads
                    if watcher is None or watcher.done():
                        log.info("ticker: %s stands by (another node leads)", self.node)
                        watcher = asyncio.create_task(self._watch_renewals(kv))
                except Exception as err:  # NATS unreachable, cluster without quorum
                    log.warning("ticker: campaign failed (%s)", err)
                    self._kv = None
                self.term = None
                await stopped_within(stop, self._next_try())
            return False
        finally:
            if watcher is not None:
                # Not awaited: a new leader starts its term now, whatever the unsubscribe takes.
                watcher.cancel()

    def _next_try(self) -> float:
        """Seconds until the next campaign attempt: just past the expiry the renewals seen
        so far imply, within `renew_s`."""
        if self._renewed_seen is None:
            return self.renew_s
        expiry = self._renewed_seen + self.ttl_s + EXPIRY_SLACK_S - time.monotonic()
        return min(self.renew_s, max(EXPIRY_SLACK_S, expiry))

    async def _watch_renewals(self, kv) -> None:
        """Note when each renewal of the lease arrives (another node's)."""
        self._renewed_seen = time.monotonic()
        watcher = await kv.watch(names.LEADER_KEY)
        try:
            # Not `updates(timeout=)`: its asyncio.wait_for lets a cancel that comes with an
            # update go unseen (Python 3.11), and the update that cancels this watcher is this
            # node's own election: the leader's watcher ran on, one more every term.
            async for entry in watcher:
                if entry is not None:  # None marks the end of the current values
                    self._renewed_seen = time.monotonic()
                    self._seen_revision = entry.revision if entry.operation is None else None  # DEL, PURGE: gone
        finally:
            self._renewed_seen = self._seen_revision = None
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.ttl_s):
                    await watcher.stop()

    async def _claim(self, kv) -> int:
        """Create the key; or, after stepping down on a stall, take it back if nobody wrote it
        since our last renewal; or take over a lease whose last renewal seen is a TTL old.
        Both updates are conditional on that revision, so neither can take a lease renewed
        since."""
        last = self.revision if self.revision is not None else self._lapsed_revision()
        if last is not None:
            try:
                return await kv.update(names.LEADER_KEY, self._value(), last=last)
            except (KeyWrongLastSequenceError, KeyNotFoundError):
                pass  # someone renewed, led or resigned since: only a create can win now
            finally:
                self.revision = None
        return await kv.create(names.LEADER_KEY, self._value())

    def _lapsed_revision(self) -> int | None:
        """The revision of another node's lease whose last renewal seen is a TTL old, if any.
        The renewal was sent before it arrived here, so its leader's own deadline (a TTL less
        its margin after it sent it) has passed: it fires no more."""
        if self._renewed_seen is None or self._seen_revision is None:
            return None
        if time.monotonic() < self._renewed_seen + self.ttl_s + EXPIRY_SLACK_S:
            return None
        return self._seen_revision

    async def hold(self, stop: asyncio.Event) -> None:
        """Renew the lease until it is lost or `stop` is set; return when no longer leading."""
        try:
            while not stop.is_set():
                wait = max(0.0, min(self.renew_s, self._deadline - time.monotonic()))
                if await stopped_within(stop, wait):
                    return
                if time.monotonic() >= self._deadline:
                    log.warning("ticker: %s could not renew its lease in time; stepping down", self.node)
                    return
                started = time.monotonic()
                try:
                    kv = await self.bucket()
                    async with asyncio.timeout(max(0.1, self._deadline - started)):
                        self.revision = await kv.update(names.LEADER_KEY, self._value(), last=self.revision)
                    self._deadline = started + self.ttl_s - self.margin_s
                except KeyWrongLastSequenceError:
                    log.warning("ticker: %s lost its lease to another node; stepping down", self.node)
                    return
                except Exception as err:
                    log.warning("ticker: lease renewal failed (%s); retrying until the deadline", err)
        finally:
            # `revision` stays for resign(); the term is over.
            self.term = None

    async def resign(self) -> None:
        """Give the lease up at once (clean shutdown): a standby takes over without waiting a TTL."""
        rev, self.revision = self.revision, None
        if rev is None:
            return
        with contextlib.suppress(Exception):
            kv = await self.bucket()
            # Only if it is still ours: delete with a revision check is not in nats-py's KV
            # API, so read first; the window is one round trip.
            entry = await kv.get(names.LEADER_KEY)
            if entry.revision == rev:
                await kv.delete(names.LEADER_KEY)


async def current_leader(js: JetStreamContext) -> LeaseInfo | None:
    """Who holds the ticker lease now, for `kjob status`."""
    try:
        kv = await js.key_value(names.LEADER_BUCKET)
        entry = await kv.get(names.LEADER_KEY)
    except (BucketNotFoundError, NotFoundError, KeyNotFoundError):
        return None
    except Exception:
        return None
    if not entry.value:
        return None
    data = json.loads(entry.value)
    return LeaseInfo(node=data["node"], revision=entry.revision or 0, since=data["since"], renewed=data["renewed"])
