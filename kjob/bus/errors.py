"""What a call to NATS raises when the server or the way to it is away: nats-py's own errors
(JetStream's among them, and its timeouts), and the socket's."""

from __future__ import annotations

import nats.errors

BUS_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, OSError, TimeoutError)
