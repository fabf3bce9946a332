"""A TCP proxy that can black-hole its connections: a network partition, for one client.

`blackhole()` keeps every connection open but moves no byte either way (what a partition does:
no reset, no error, just silence; the client finds out only by its own deadlines), and new
connections are accepted and then left silent too. `heal()` lets bytes flow again on
connections opened from then on, and drops the ones that went through the partition, as TCP
would once the peer's retransmissions gave up.

`stall()` holds every byte instead, to deliver it at `resume()`: the client's view of a server
that was paused (SIGSTOP), whose sockets keep what was sent meanwhile. `stalled_bytes` counts
what waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class TcpProxy:
    """Listens on 127.0.0.1:<port> and forwards to `target`; runs its own loop in a thread."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcpproxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._open = True  # bytes flow
        self._flowing = asyncio.Event()
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._held: set[asyncio.StreamWriter] = set()
        self._moving = asyncio.Event()  # clear: stalled
        self._moving.set()
        self.stalled_bytes = 0

    def start(self) -> "TcpProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._drop_all()

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- faults ---------------------------------------------------------------------------

    def blackhole(self) -> None:
        self._call(self._blackhole)

    def heal(self) -> None:
        self._call(self._heal)

    def stall(self) -> None:
        self._call(self._moving.clear)

    def resume(self) -> None:
        self._call(self._moving.set)

    def _call(self, fn) -> None:
        async def run() -> None:
            fn()
        asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def _blackhole(self) -> None:
        self._flowing.clear()

    def _heal(self) -> None:
        self._drop_all()  # what went into the hole is gone: those connections end
        self._flowing.set()

    def _drop_all(self) -> None:
        for pair in list(self._links):
            for writer in pair:
                writer.transport.abort()
        for writer in list(self._held):
            writer.transport.abort()
        self._links.clear()
        self._held.clear()

    # -- forwarding -----------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._flowing.is_set():  # accepted, then silence
            self._held.add(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._links.add(pair)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        self._links.discard(pair)
        for w in pair:
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            # In the hole, bytes are swallowed: nothing reaches the other side, nothing errors.
            if not self._flowing.is_set():
                continue
            if not self._moving.is_set():
                self.stalled_bytes += len(data)
                await self._moving.wait()
            writer.write(data)
            await writer.drain()
