"""RecordingRelay: a real HTTP server standing in for Kode Relay (or a webhook) in tests.

It listens on 127.0.0.1 on a free port, in a background thread, so async tests keep their
event loop. It records every request and answers as programmed:

    with RecordingRelay() as relay:              # or `async with`, or start()/stop()
        relay.fail(status=503, seconds=30)       # 503 for the next 30 s, then 200
        relay.fail(status=400, count=1)          # 400 for the next request, then 200
        relay.delay(seconds=5, count=1)          # hold the next answer 5 s (client timeouts)
        ...
        await relay.wait_for(lambda r: len(r.accepted) >= 2, timeout=10)
        assert relay.accepted[0].headers["idempotency-key"] == run_id

Rules apply in the order they were added; a rule is spent when its count or time runs out.
With `token=...` it answers 401 to any request without `Authorization: Bearer <token>`, as
Relay does.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  #: with the query string, as sent
    headers: dict[str, str]  #: names lower-cased
    body: bytes
    json: Any  #: the body parsed as JSON; None when it is not JSON
    at: float  #: time.monotonic() on arrival, to measure retry intervals
    received_at: datetime  #: wall clock (UTC) on arrival
    status: int  #: what the relay answered (or was about to, if the client gave up first)

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")


@dataclass
class _Rule:
    status: int | None  #: None: answer normally, only later (a delay rule)
    delay_s: float = 0.0
    count: int | None = None  #: requests left; None: unlimited until `until`
    until: float | None = None  #: monotonic deadline; None: until count runs out

    def live(self, now: float) -> bool:
        if self.until is not None and now >= self.until:
            return False
        return self.count is None or self.count > 0


@dataclass
class _State:
    lock: threading.RLock = field(default_factory=threading.RLock)  # wait_until re-enters it
    changed: threading.Condition = field(init=False)
    stopping: threading.Event = field(default_factory=threading.Event)
    rules: list[_Rule] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)
    token: str | None = None

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)


class RecordingRelay:
    def __init__(self, token: str | None = None) -> None:
        self._state = _State(token=token)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> "RecordingRelay":
        if self._server is not None:
            raise RuntimeError("this RecordingRelay is already running")
        state = self._state

        class Handler(_Handler):
            relay_state = state

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # A delayed answer must not hold up stop(): its thread dies with the test process.
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="recording-relay", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._state.stopping.set()  # wakes handlers sleeping in a delay
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> "RecordingRelay":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> "RecordingRelay":
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("start the RecordingRelay first")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:40123`: what KJOB_RELAY_URL would hold."""
        return f"http://127.0.0.1:{self.port}"

    # behaviour

    def fail(self, status: int = 503, *, seconds: float | None = None, count: int | None = None) -> None:
        """Answer `status` for the next `count` requests, or for the next `seconds`, then as before.
        With neither, fail until `reset_behaviour()`."""
        until = time.monotonic() + seconds if seconds is not None else None
        self._add(_Rule(status=status, count=count, until=until))

    def delay(self, seconds: float, *, count: int | None = None, status: int | None = None) -> None:
        """Hold the answer to the next `count` requests (all, when None) for `seconds`; then
        answer `status`, or normally when None."""
        self._add(_Rule(status=status, delay_s=seconds, count=count))

    def reset_behaviour(self) -> None:
        with self._state.lock:
            self._state.rules.clear()

    def clear(self) -> None:
        """Forget the recorded requests and the programmed behaviour."""
        with self._state.lock:
            self._state.rules.clear()
            self._state.requests.clear()

    def _add(self, rule: _Rule) -> None:
        with self._state.lock:
            self._state.rules.append(rule)

    # what arrived

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far, in arrival order (a copy)."""
        with self._state.lock:
            return list(self._state.requests)

    @property
    def accepted(self) -> list[RecordedRequest]:
        """The requests answered 2xx (including any whose client gave up during a delay)."""
        return [r for r in self.requests if 200 <= r.status < 300]

    def wait_until(self, predicate: Callable[["RecordingRelay"], bool], timeout: float = 5.0) -> None:
        """Block until `predicate(self)` holds; AssertionError after `timeout` seconds. For sync
        code only: in async tests use `wait_for`."""
        deadline = time.monotonic() + timeout
        with self._state.changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(self._timeout_message(timeout))
                self._state.changed.wait(left)

    async def wait_for(self, predicate: Callable[["RecordingRelay"], bool], timeout: float = 5.0) -> None:
        """Wait, without blocking the event loop, until `predicate(self)` holds; AssertionError
        naming what did arrive after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                raise AssertionError(self._timeout_message(timeout))
            await asyncio.sleep(0.01)

    def _timeout_message(self, timeout: float) -> str:
        seen = [f"{r.method} {r.path} -> {r.status}" for r in self.requests]
        return f"condition not met within {timeout:g}s; requests so far: {seen or 'none'}"


class _Handler(BaseHTTPRequestHandler):
    relay_state: _State
    protocol_version = "HTTP/1.1"  # keep-alive, as a real Relay would

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def _handle(self) -> None:
        state = self.relay_state
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        now = time.monotonic()
        with state.lock:
            status, delay_s = self._decide(state, headers, now)
            state.requests.append(
                RecordedRequest(
                    method=self.command,
                    path=self.path,
                    headers=headers,
                    body=body,
                    json=_json_or_none(body),
                    at=now,
                    received_at=datetime.now(timezone.utc),
                    status=status,
                )
            )
            state.changed.notify_all()
        if delay_s and state.stopping.wait(delay_s):
            self.close_connection = True  # the relay is stopping: drop the request unanswered
            return
        answer = json.dumps({"ok": 200 <= status < 300, "status": status}).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up waiting (a timeout test)

    @staticmethod
    def _decide(state: _State, headers: dict[str, str], now: float) -> tuple[int, float]:
        """(status, delay) for one request; spends the rules it uses. Caller holds the lock."""
        if state.token is not None and headers.get("authorization") != f"Bearer {state.token}":
            return 401, 0.0  # refused before any programmed behaviour, as Relay's auth would
        state.rules[:] = [r for r in state.rules if r.live(now)]
        failing = next((r for r in state.rules if not r.delay_s), None)
        slow = next((r for r in state.rules if r.delay_s), None)
        status, delay_s = 200, 0.0
        if slow is not None:
            delay_s, status = slow.delay_s, slow.status or status
        if failing is not None and failing.status is not None:
            status = failing.status
        for rule in (failing, slow):
            if rule is not None and rule.count is not None:
                rule.count -= 1
        return status, delay_s

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the recorded requests are the log


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None
