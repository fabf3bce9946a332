"""Observability: logs (`logging`), traces (`tracing`) and metrics (`metrics`).

`setup(settings)` configures all three for a process that runs kjob (`kjob up`, `kjob server`):
log format and level from the settings, OTLP export of traces and metrics when the standard
`OTEL_*` variables ask for it. docs/observability.md is the operator's guide.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kjob.config import Settings


def setup(settings: "Settings") -> None:
    from kjob.telemetry import logging, metrics, tracing

    node = settings.node_name or socket.gethostname()
    logging.setup(settings.log_level, settings.log_format, node)
    tracing.setup(node)
    metrics.setup(node)
