"""The D-Bus service against a real dbus-daemon and a real `kjob up --dbus`, called as a desktop
client would with dbus-fast: roles and tenancy are the API's, and signals reach only the
subscribers of the event's tenant."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from kjob import dbus
from kjob.config import Settings
from kjob.dbus import BUS_NAME, INTERFACE, OBJECT_PATH
from kjob.dbus.service import to_bus_daemon
from kjob.errors import InvalidInput, ServerError
from kjob.embedded.nats import EmbeddedNats
from tests.support.servers import TestDatabases

KJOB = str(Path(sys.executable).with_name("kjob"))
ERROR = "dev.koder.scheduler.Error"
DOCS = Path(__file__).parents[2] / "docs" / "dbus.md"
#: What each documented shell line prints, by the method it calls.
SHAPES = {
    "ListJobs": r'^a\(sbss\) 2 "beep" (true|false) "@every 1h" "[^"]*" "hello" true "@every 1h" "\S+Z"',
    "RunNow": r'^s "[0-9a-f-]{36}"',
    "InspectJob": r"^\('\{.*\"slug\": \"hello\"",
    "Disable": r'"enabled": false',
    "Enable": r'"enabled": true',
    "introspect": r"\.RunNow\s+method\s+ss\s+s",
}
JOB = {"prompt": "echo hi", "agent": "shell", "schedule": "@every 1h"}


@pytest.fixture(scope="module")
def bus_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A session bus of this module's own (Debian's dbus-daemon)."""
    if shutil.which("dbus-daemon") is None:
        pytest.fail("dbus-daemon is missing: install Debian's `dbus` package (.ci/docker.sh does)")
    path = tmp_path_factory.mktemp("dbus") / "bus"
    proc = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address", f"--address=unix:path={path}"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()  # printed once it listens
    assert address.startswith("unix:"), f"dbus-daemon printed {address!r}"
    yield address
    proc.terminate()
    proc.wait(10)


@dataclass
class Kjob:
    api: httpx.AsyncClient
    tokens: dict[str, str] = field(default_factory=dict)

    async def token(self, role: str, tenant: str | None = None) -> str:
        return (await self.new_token(role, tenant))["secret"]

    async def new_token(self, role: str, tenant: str | None = None) -> dict:
        answer = await self.api.post("/v1/tokens", json={"role": role, "name": "dbus test", "tenant": tenant})
        assert answer.status_code == 201, answer.text
        return answer.json()


@pytest.fixture(scope="module")
async def kjob(bus_address: str, template_databases: TestDatabases,
               tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Kjob]:
    """`kjob up --dbus` on the session bus of DBUS_SESSION_BUS_ADDRESS, as on a desktop; its own
    NATS, so no other test's events or runs reach it."""
    base = tmp_path_factory.mktemp("kjob-dbus")
    home = base / "home"
    nats = EmbeddedNats(base / "nats").start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KJOB_")}
    env.update(KJOB_HOME=str(home), KJOB_NATS_URL=nats.url, KJOB_DATABASE_URL=await template_databases.create(),
               KJOB_EXECUTOR__SANDBOXES='["process"]', DBUS_SESSION_BUS_ADDRESS=bus_address,
               KJOB_DBUS__RECHECK_S="0.001")  # every delivery checks the subscriber's token
    log_path = base / "up.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([KJOB, "up", "--dbus", "--port", "0"], env=env, stdout=log, stderr=log)
    url_file = home / "api.url"
    deadline = time.monotonic() + 30
    while not (url_file.exists() and url_file.read_text().strip()):  # written once D-Bus serves too
        assert proc.poll() is None, f"kjob up exited: {log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"kjob up not ready in 30 s: {log_path.read_text()[-3000:]}"
        await asyncio.sleep(0.1)
    admin = (home / "admin.token").read_text().strip()
    async with httpx.AsyncClient(base_url=url_file.read_text().strip(),
                                 headers={"Authorization": f"Bearer {admin}"}) as api:
        running = Kjob(api)
        running.tokens = {"editor": await running.token("editor"), "viewer": await running.token("viewer"),
                          "other": await running.token("editor", tenant="other")}
        for slug in ("hello", "beep"):
            assert (await api.post("/v1/jobs", json={"slug": slug, **JOB})).status_code == 201
        other = httpx.Headers({"Authorization": f"Bearer {running.tokens['other']}"})
        assert (await api.post("/v1/jobs", json={"slug": "theirs", **JOB}, headers=other)).status_code == 201
        yield running
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log_path.read_text()[-3000:]
    nats.stop()


class Peer:
    """One client connection to the bus, recording the kjob signals it receives."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.signals: asyncio.Queue[Message] = asyncio.Queue()
        bus.add_message_handler(self._record)

    def _record(self, msg: Message) -> None:
        if msg.message_type == MessageType.SIGNAL and msg.interface == INTERFACE:
            self.signals.put_nowait(msg)

    async def reply(self, member: str, signature: str = "", *body, interface: str = INTERFACE) -> Message:
        return await self.bus.call(Message(destination=BUS_NAME, path=OBJECT_PATH, interface=interface,
                                           member=member, signature=signature, body=list(body)))

    async def call(self, member: str, signature: str = "", *body):
        reply = await self.reply(member, signature, *body)
        assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        return reply.body[0] if reply.body else None

    async def refused(self, member: str, signature: str, *body) -> tuple[str, str]:
        reply = await self.reply(member, signature, *body)
        assert reply.message_type == MessageType.ERROR, reply.body
        return reply.error_name, reply.body[0]

    async def signal(self, member: str, timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            msg = await asyncio.wait_for(self.signals.get(), max(0.0, deadline - time.monotonic()))
            if msg.member == member:
                return msg.body


@pytest.fixture
async def peers(bus_address: str) -> AsyncIterator:
    opened: list[MessageBus] = []

    async def peer() -> Peer:
        opened.append(await MessageBus(bus_address=bus_address).connect())
        return Peer(opened[-1])

    yield peer
    for bus in opened:
        bus.disconnect()


async def test_methods_have_the_api_roles_and_tenancy(kjob: Kjob, peers) -> None:
    me = await peers()
    editor, viewer, other = kjob.tokens["editor"], kjob.tokens["viewer"], kjob.tokens["other"]

    rows = {row[0]: row for row in await me.call("ListJobs", "s", editor)}
    assert set(rows) == {"hello", "beep"}, rows  # never the other tenant's job
    slug, enabled, schedule, next_fire = rows["hello"]
    assert (enabled, schedule) == (True, "@every 1h") and next_fire.endswith("Z")
    inspected = json.loads(await me.call("InspectJob", "ss", editor, "hello"))
    assert (inspected["slug"], inspected["tenant"], inspected["prompt"]) == ("hello", "default", "echo hi")

    run_id = await me.call("RunNow", "ss", editor, "hello")
    run = await kjob.api.get(f"/v1/runs/{run_id}")
    assert run.status_code == 200 and run.json()["trigger"] == "manual", run.text

    await me.call("Disable", "sss", editor, "hello", "maintenance window")
    job = (await kjob.api.get("/v1/jobs/hello")).json()
    assert (job["enabled"], job["paused_note"]) == (False, "maintenance window")
    assert json.loads(await me.call("Enable", "ss", editor, "hello"))["enabled"] is True
    assert (await kjob.api.get("/v1/jobs/hello")).json()["enabled"] is True

    # A viewer reads but cannot start a run: the API's 403, as a D-Bus error saying why.
    assert len(await me.call("ListJobs", "s", viewer)) == 2
    runs_before = (await kjob.api.get("/v1/jobs/hello/runs")).json()
    name, text = await me.refused("RunNow", "ss", viewer, "hello")
    assert name == f"{ERROR}.Forbidden" and "viewer" in text and "operator" in text, text
    name, _ = await me.refused("Disable", "sss", viewer, "hello", "")
    assert name == f"{ERROR}.Forbidden"
    assert (await kjob.api.get("/v1/jobs/hello/runs")).json() == runs_before

    # Another tenant's job is as absent as one that does not exist; its owner sees it.
    for member, signature, args in (("InspectJob", "ss", ()), ("RunNow", "ss", ()), ("Disable", "sss", ("x",))):
        name, text = await me.refused(member, signature, editor, "theirs", *args)
        assert name == f"{ERROR}.NotFound" and "theirs" in text, (member, name, text)
    assert json.loads(await me.call("InspectJob", "ss", other, "theirs"))["tenant"] == "other"
    assert (await kjob.api.get("/v1/jobs/theirs")).status_code == 404

    for bad in ("", "kjob_nope_nope", editor + "x"):
        name, text = await me.refused("ListJobs", "s", bad)
        assert name == f"{ERROR}.Unauthorized", (bad, name, text)
    name, _ = await me.refused("Subscribe", "s", "kjob_nope_nope")
    assert name == f"{ERROR}.Unauthorized"
    name, text = await me.refused("InspectJob", "ss", editor, "../tokens")
    assert name == f"{ERROR}.InvalidArgument" and "slug" in text, text


async def test_signals_reach_only_subscribers_of_the_tenant(kjob: Kjob, peers) -> None:
    mine, theirs, listener = await peers(), await peers(), await peers()
    assert await mine.call("Subscribe", "s", kjob.tokens["viewer"]) == "default"
    assert await theirs.call("Subscribe", "s", kjob.tokens["other"]) == "other"
    # A peer that only listens, as it would for a broadcast signal: it must get nothing.
    await listener.bus.call(to_bus_daemon("AddMatch", f"type='signal',interface='{INTERFACE}'"))

    run_id = await mine.call("RunNow", "ss", kjob.tokens["editor"], "beep")
    assert await mine.signal("RunFinished") == ["default", "beep", run_id, "succeeded"]
    await mine.call("Disable", "sss", kjob.tokens["editor"], "beep", "a secret note")
    assert await mine.signal("JobChanged") == ["default", "beep", "disabled"]

    # The service sent everything above before answering these calls; a peer's messages
    # arrive in order, so a misdirected signal would already be queued.
    await theirs.call("ListJobs", "s", kjob.tokens["other"])
    introspection = await listener.reply("Introspect", interface="org.freedesktop.DBus.Introspectable")
    assert 'name="RunFinished"' in introspection.body[0] and 'name="RunNow"' in introspection.body[0]
    assert theirs.signals.empty() and listener.signals.empty(), (theirs.signals, listener.signals)

    # After Unsubscribe, no more signals: a witness still subscribed gets the next one first.
    witness = await peers()
    await witness.call("Subscribe", "s", kjob.tokens["editor"])
    await mine.call("Unsubscribe")
    await mine.call("Enable", "ss", kjob.tokens["editor"], "beep")
    assert await witness.signal("JobChanged") == ["default", "beep", "enabled"]
    await mine.call("ListJobs", "s", kjob.tokens["viewer"])
    assert mine.signals.empty()


async def test_a_revoked_token_gets_no_more_signals(kjob: Kjob, peers) -> None:
    revoked, witness = await peers(), await peers()
    token = await kjob.new_token("viewer")
    await revoked.call("Subscribe", "s", token["secret"])  # first: the service checks it first
    await witness.call("Subscribe", "s", kjob.tokens["viewer"])
    assert (await kjob.api.delete(f"/v1/tokens/{token['id']}")).status_code == 204
    await witness.call("Disable", "sss", kjob.tokens["editor"], "beep", "")
    assert await witness.signal("JobChanged") == ["default", "beep", "disabled"]
    await revoked.reply("Introspect", interface="org.freedesktop.DBus.Introspectable")
    assert revoked.signals.empty()
    await witness.call("Enable", "ss", kjob.tokens["editor"], "beep")


async def test_the_shell_examples_of_the_docs_work(kjob: Kjob, bus_address: str) -> None:
    """docs/dbus.md's busctl and gdbus lines, as written, with an editor's token."""
    lines = [line for line in DOCS.read_text().splitlines() if line.startswith(("busctl ", "gdbus "))]
    assert len(lines) >= 5, lines
    env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": bus_address, "TOKEN": kjob.tokens["editor"]}
    for line in lines:
        done = await asyncio.to_thread(subprocess.run, ["sh", "-c", line], env=env, capture_output=True, text=True,
                                       timeout=20)
        assert done.returncode == 0, (line, done.stdout, done.stderr)
        shape = next(shape for word, shape in SHAPES.items() if word in line)
        assert re.search(shape, done.stdout), (line, done.stdout)
    assert (await kjob.api.get("/v1/jobs/hello")).json()["enabled"] is True  # Disable, then Enable


def _settings(**dbus) -> Settings:
    return Settings(dbus={"enabled": True, **dbus})


async def test_a_node_that_cannot_serve_the_name_says_why(kjob: Kjob, bus_address: str, tmp_path: Path) -> None:
    unused = ("nats://127.0.0.1:9", "http://127.0.0.1:9")  # start() reaches neither
    with pytest.raises(ServerError, match="dev.koder.scheduler is already owned on .*another kjob node"):
        await dbus.start(_settings(address=bus_address), *unused)
    with pytest.raises(ServerError, match="cannot connect to D-Bus at unix:path="):
        await dbus.start(_settings(address=f"unix:path={tmp_path}/no-bus"), *unused)
    with pytest.raises(InvalidInput, match="dbus.api_url"):
        await dbus.start(_settings(address=bus_address), unused[0], None)


def _system_bus(base: Path, policy: str) -> subprocess.Popen:
    """A dbus-daemon with the default policy of /usr/share/dbus-1/system.conf (no one owns or
    calls anything) plus `policy`, as /etc/dbus-1/system.d would add it."""
    (base / "policy.conf").write_text(policy)
    (base / "bus.conf").write_text(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path={base}/bus</listen>
  <policy context="default">
    <allow user="*"/><deny own="*"/><deny send_type="method_call"/><allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/><allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/><allow receive_type="method_return"/><allow receive_type="error"/>
    <allow receive_type="signal"/><allow send_destination="org.freedesktop.DBus"/>
  </policy>
  <include>{base}/policy.conf</include>
</busconfig>""")
    proc = subprocess.Popen(["dbus-daemon", f"--config-file={base}/bus.conf", "--nofork", "--print-address"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None and proc.stdout.readline().startswith("unix:")
    return proc


async def test_the_system_bus_policy_lets_the_kjob_user_own_the_name_and_anyone_call(kjob: Kjob,
                                                                                     tmp_path: Path) -> None:
    shipped = (Path(__file__).parents[2] / "deploy" / "dbus" / "dev.koder.scheduler.conf").read_text()
    api_url = str(kjob.api.base_url).rstrip("/")
    for user, owns in (("nobody", False), (pwd.getpwuid(os.getuid()).pw_name, True)):
        base = tmp_path / user
        base.mkdir()
        daemon = _system_bus(base, shipped.replace('user="kjob"', f'user="{user}"'))
        settings = _settings(bus="system", address=f"unix:path={base}/bus")
        try:
            if not owns:
                with pytest.raises(ServerError, match="does not let kjob own .*deploy/dbus/dev.koder.scheduler.conf"):
                    await dbus.start(settings, "nats://127.0.0.1:9", api_url)
                continue
            service = await dbus.start(settings, "nats://127.0.0.1:9", api_url)
            caller = Peer(await MessageBus(bus_address=f"unix:path={base}/bus").connect())
            try:
                rows = await caller.call("ListJobs", "s", kjob.tokens["viewer"])
                assert {row[0] for row in rows} == {"hello", "beep"}
            finally:
                caller.bus.disconnect()
                service._bus.disconnect()
        finally:
            daemon.terminate()
            daemon.wait(10)
