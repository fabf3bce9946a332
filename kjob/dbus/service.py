"""The D-Bus service: interface `dev.koder.scheduler.Jobs1` at `/dev/koder/scheduler`.

Each method takes the caller's API token as its first argument and makes one request to the
gateway with it, so a D-Bus call can do exactly what that token can do over HTTP. Signals are
sent to each subscriber alone (a destination on the message), never broadcast: a broadcast
would reach every peer on the bus, whatever its tenant.
"""

# No `from __future__ import annotations`: dbus-fast reads the D-Bus types from the annotations.

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from collections.abc import AsyncIterator
from typing import Annotated

from dbus_fast import BusType, DBusError, ErrorType, Message, MessageType, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature, DBusStr
from dbus_fast.service import ServiceInterface, dbus_method, dbus_signal
from pydantic import BaseModel, ValidationError

from kjob.bus import names
from kjob.bus.messages import Event
from kjob.bus.setup import connect
from kjob import client, errors
from kjob.config import Settings
from kjob.dbus.api import Gateway
from kjob.dbus.signals import KINDS, signal_for
from kjob.errors import InvalidInput, ServerError

log = logging.getLogger(__name__)

BUS_NAME = "dev.koder.scheduler"
OBJECT_PATH = "/dev/koder/scheduler"
INTERFACE = "dev.koder.scheduler.Jobs1"
ERROR = "dev.koder.scheduler.Error"
CONNECT_TIMEOUT_S = 10.0

#: kjob.client's exceptions -> the D-Bus error name (ERROR.<name>), most specific first; the
#: message is the API's.
_ERROR_NAMES = ((client.RateLimited, "RateLimited"), (client.Conflict, "Conflict"),
                (client.Unauthorized, "Unauthorized"), (client.Forbidden, "Forbidden"),
                (client.NotFound, "NotFound"), (errors.InvalidInput, "InvalidArgument"),
                (client.ServerUnavailable, "Unavailable"))

JobRows = Annotated[list[tuple[str, bool, str, str]], DBusSignature("a(sbss)")]


def to_bus_daemon(member: str, arg: str) -> Message:
    """A call of the bus itself (org.freedesktop.DBus) with one string argument."""
    return Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
                   member=member, signature="s", body=[arg])


def dbus_error(err: Exception) -> DBusError:
    name = next((name for kind, name in _ERROR_NAMES if isinstance(err, kind)), "Failed")
    return DBusError(f"{ERROR}.{name}", str(err))


@contextlib.asynccontextmanager
async def _as_dbus():
    """kjob's refusals as D-Bus errors (anything else is a bug: dbus-fast logs it)."""
    try:
        yield
    except (client.ApiError, errors.InvalidInput) as err:
        raise dbus_error(err) from None


def _json(view: BaseModel) -> str:
    return json.dumps(view.model_dump(mode="json"))


class JobsInterface(ServiceInterface):
    def __init__(self, gateway: Gateway) -> None:
        super().__init__(INTERFACE)
        self._gateway = gateway

    @contextlib.asynccontextmanager
    async def _as(self, token: str) -> AsyncIterator[client.AsyncClient]:
        async with _as_dbus(), self._gateway.as_caller(token) as api:
            yield api

    @dbus_method()
    async def ListJobs(self, token: DBusStr) -> JobRows:
        """(slug, enabled, schedule, next fire in UTC or "") of every job of the token's tenant."""
        async with self._as(token) as api:
            return [(job.slug, job.enabled, job.schedule, job.next_fire or "") async for job in api.jobs.list()]

    @dbus_method()
    async def InspectJob(self, token: DBusStr, slug: DBusStr) -> DBusStr:
        """The job as JSON, as `GET /v1/jobs/{slug}` answers."""
        async with self._as(token) as api:
            return _json(await api.jobs.get(slug))

    @dbus_method()
    async def RunNow(self, token: DBusStr, slug: DBusStr) -> DBusStr:
        """Start a manual run; answers its run id."""
        async with self._as(token) as api:
            return (await api.runs.run_now(slug)).id

    @dbus_method()
    async def Enable(self, token: DBusStr, slug: DBusStr) -> DBusStr:
        async with self._as(token) as api:
            return _json(await api.jobs.enable(slug))

    @dbus_method()
    async def Disable(self, token: DBusStr, slug: DBusStr, note: DBusStr) -> DBusStr:
        """An empty note is none."""
        async with self._as(token) as api:
            return _json(await api.jobs.disable(slug, note=note or None))

    # Subscribe and Unsubscribe need the caller's unique bus name, which dbus-fast does not give
    # interface methods: Subscriptions.handle answers them before these are reached. They are
    # declared here so that introspection (busctl, gdbus, d-feet) shows them.
    @dbus_method()
    async def Subscribe(self, token: DBusStr) -> DBusStr:
        raise DBusError(ErrorType.FAILED, "Subscribe is answered by the subscription handler")

    @dbus_method()
    async def Unsubscribe(self) -> None:
        raise DBusError(ErrorType.FAILED, "Unsubscribe is answered by the subscription handler")

    @dbus_signal()
    def RunFinished(self) -> Annotated[list[str], DBusSignature("ssss")]:
        """tenant, slug, run id, status. Declared for introspection; sent by Subscriptions."""
        raise NotImplementedError

    @dbus_signal()
    def JobChanged(self) -> Annotated[list[str], DBusSignature("sss")]:
        """tenant, slug, change (created, updated, enabled, disabled, deleted, paused)."""
        raise NotImplementedError


@dataclass
class Subscriber:
    token: str
    tenant: str
    checked_at: float


class Subscriptions:
    """Peers that asked for signals, by unique bus name, each with the tenant of its token."""

    def __init__(self, bus: MessageBus, gateway: Gateway, recheck_s: float) -> None:
        self._bus, self._gateway, self._recheck_s = bus, gateway, recheck_s
        self.by_name: dict[str, Subscriber] = {}
        self._tasks: set[asyncio.Task] = set()

    def handle(self, msg: Message) -> Message | bool | None:
        """dbus-fast's message hook: Subscribe/Unsubscribe calls, and peers leaving the bus."""
        if msg.message_type == MessageType.SIGNAL:
            if msg.member == "NameOwnerChanged" and msg.sender == "org.freedesktop.DBus" and not msg.body[2]:
                self.by_name.pop(msg.body[0], None)
            return None
        if (msg.message_type != MessageType.METHOD_CALL or msg.path != OBJECT_PATH
                or msg.interface not in (INTERFACE, None) or msg.member not in ("Subscribe", "Unsubscribe")):
            return None
        if msg.member == "Unsubscribe":
            self.by_name.pop(msg.sender, None)
            return Message.new_method_return(msg)
        if msg.signature != "s":
            return Message.new_error(msg, ErrorType.INVALID_ARGS, "Subscribe takes one argument: an API token (s)")
        task = asyncio.create_task(self._subscribe(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _subscribe(self, msg: Message) -> None:
        try:
            async with _as_dbus():
                tenant = await self._gateway.tenant_of(msg.body[0])
        except DBusError as err:
            self._bus.send(Message.new_error(msg, err.type, err.text))
            return
        # The peer may have left while the API answered; its NameOwnerChanged is then past.
        owner = await self._bus.call(to_bus_daemon("GetNameOwner", msg.sender))
        if owner.message_type == MessageType.ERROR:
            return
        self.by_name[msg.sender] = Subscriber(msg.body[0], tenant, time.monotonic())
        self._bus.send(Message.new_method_return(msg, "s", [tenant]))

    async def deliver(self, event: Event) -> None:
        spec = signal_for(event)
        if spec is None:
            return
        for name, sub in list(self.by_name.items()):
            if sub.tenant != event.tenant or not await self._still_valid(name, sub):
                continue
            self._bus.send(Message(message_type=MessageType.SIGNAL, destination=name, path=OBJECT_PATH,
                                   interface=INTERFACE, member=spec.member, signature=spec.signature, body=spec.body))

    async def _still_valid(self, name: str, sub: Subscriber) -> bool:
        """A revoked token stops its signals within `recheck_s`; while the gateway cannot say,
        nothing is sent (fail closed)."""
        if time.monotonic() - sub.checked_at < self._recheck_s:
            return True
        try:
            await self._gateway.tenant_of(sub.token)
        except client.Unauthorized:
            log.info("dbus: dropping subscriber %s: its token is no longer valid", name)
            self.by_name.pop(name, None)
            return False
        except client.ApiError:
            return False
        sub.checked_at = time.monotonic()
        return True


class DbusService:
    def __init__(self, bus: MessageBus, subscriptions: Subscriptions, nats_url: str) -> None:
        self._bus, self._subscriptions, self._nats_url = bus, subscriptions, nats_url

    async def run(self, stop: asyncio.Event) -> None:
        """Turn kjob's events into signals until `stop` (plain NATS subscriptions: a signal is
        a live notice, not replayed to a peer that was not subscribed)."""
        events: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10_000)

        async def received(msg) -> None:
            with contextlib.suppress(asyncio.QueueFull):  # a stuck bus drops notices, not the node
                events.put_nowait(msg.data)

        nc = await connect(self._nats_url, name="kjob-dbus")
        try:
            for kind in KINDS:
                await nc.subscribe(names.event("*", kind), cb=received)
            stopper = asyncio.create_task(stop.wait())
            try:
                while not stop.is_set():
                    getter = asyncio.create_task(events.get())
                    done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                        break
                    try:
                        event = Event.model_validate_json(getter.result())
                    except ValidationError as err:
                        log.warning("dbus: ignoring an event that is not one: %s", err)
                        continue
                    await self._subscriptions.deliver(event)
            finally:
                stopper.cancel()
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()
            self._bus.disconnect()


async def start(settings: Settings, nats_url: str, api_url: str | None) -> DbusService:
    """Connect to the bus and own `dev.koder.scheduler`; `.run(stop)` then serves it.

    :raises InvalidInput: no gateway to call (names `dbus.api_url`).
    :raises ServerError: no bus at the address, or the name is owned or not allowed.
    """
    cfg = settings.dbus
    url = cfg.api_url or api_url or settings.api_url
    if not url:
        raise InvalidInput("the D-Bus service calls the API: run the api role on this node or set it", "dbus.api_url")
    where = cfg.address or f"the {cfg.bus} bus"
    try:
        # A bus whose policy rejects the replies to Hello never answers: bound the wait.
        bus = await asyncio.wait_for(MessageBus(
            bus_address=cfg.address, bus_type=BusType.SYSTEM if cfg.bus == "system" else BusType.SESSION,
        ).connect(), CONNECT_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ServerError(f"D-Bus at {where} did not answer within {CONNECT_TIMEOUT_S:.0f} s") from None
    except Exception as err:  # dbus-fast raises OSError, AuthError or ValueError for a bad address
        raise ServerError(f"cannot connect to D-Bus at {where}: {err}") from err
    try:
        gateway = Gateway(url)
        subscriptions = Subscriptions(bus, gateway, cfg.recheck_s)
        bus.add_message_handler(subscriptions.handle)
        bus.export(OBJECT_PATH, JobsInterface(gateway))
        reply = await bus.call(to_bus_daemon(
            "AddMatch", "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged'"))
        if reply.message_type == MessageType.ERROR:
            raise ServerError(f"D-Bus at {where} refused a match rule: {reply.body}")
        try:
            owned = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except DBusError as err:
            raise ServerError(f"D-Bus at {where} does not let kjob own {BUS_NAME} ({err.text}); on the system "
                              "bus install deploy/dbus/dev.koder.scheduler.conf (docs/dbus.md)") from err
        if owned not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise ServerError(f"{BUS_NAME} is already owned on {where}: is another kjob node serving it?")
    except BaseException:
        bus.disconnect()
        raise
    log.info("dbus: serving %s on %s", BUS_NAME, where)
    return DbusService(bus, subscriptions, cfg.nats_url or nats_url)
