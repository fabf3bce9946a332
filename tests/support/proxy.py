"""A TCP proxy on loopback that misbehaves on purpose, to test what a client does on the wire:
`drop` connections are closed on arrival (the client sees the server disconnect), `hold`
ones are accepted and never answered (a hung server); the rest are piped to `upstream`.
It counts every connection it accepts."""

from __future__ import annotations

import socket
import threading
from contextlib import suppress


class FlakyProxy:
    def __init__(self, upstream: tuple[str, int], *, drop: int = 0, hold: bool = False) -> None:
        self.upstream, self.drop, self.hold = upstream, drop, hold
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._held: list[socket.socket] = []
        self._closing = False
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> FlakyProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing = True
        self._listener.close()
        for conn in self._held:
            conn.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.hold:
                self._held.append(conn)
            elif self.accepted <= self.drop:
                conn.close()
            else:
                threading.Thread(target=self._pipe_both, args=(conn,), daemon=True).start()

    def _pipe_both(self, conn: socket.socket) -> None:
        with suppress(OSError):
            server = socket.create_connection(self.upstream)
            threading.Thread(target=_pipe, args=(server, conn), daemon=True).start()
            _pipe(conn, server)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
