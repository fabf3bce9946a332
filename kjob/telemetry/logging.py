"""Logs: one configuration for every role, and the run each line is about.

`setup(level, fmt, node)` is the only place the process's logging is configured
(`kjob up` and `kjob server` call it through `kjob.cli.serve._setup_logging`):

- `fmt="json"`: one JSON object per line on stderr, for a log shipper:
  `{"ts", "level", "logger", "msg", "node", "tenant", "job", "run_id", "trace_id", "span_id", "exc"}`
  (the run fields only on lines about a run, `exc` only with a traceback);
- `fmt="console"`: the usual text line, with ` [tenant/job run=... trace=...]` appended.

Which run a line is about comes from a context variable (`kjob.telemetry.runcontext`), set by
whoever handles a run (`bind`, re-exported here; done for the executor and dispatcher by
`kjob.telemetry.tracing.handles_run`).

The trace id on a run's lines is the run's own (`tracing.trace_id_for(run_id)`), also when
tracing is off, so a line can be matched with the trace once tracing is turned on.

Agent output: the executor passes each line of stdout/stderr to `agent_output`, which goes
to the `kjob.output` logger. Nothing listens to it unless a file sink is attached
(`attach_output_file`, the `executor.output_log` setting): then every line is written there
as JSON with the run's fields and `stream`. The live NATS subject `kjob.log.<tenant>.<run_id>`
is published either way (docs/observability.md).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable, Literal

from kjob.errors import InvalidInput
from kjob.telemetry import tracing
from kjob.telemetry.runcontext import bind, current, reset

__all__ = ["bind", "current", "reset", "setup", "formatter", "agent_output", "attach_output_file"]

LogFormat = Literal["json", "console"]
FORMATS: tuple[LogFormat, ...] = ("json", "console")

#: Agent stdout/stderr, one record per line; silent unless a sink is attached.
output_logger = logging.getLogger("kjob.output")
output_logger.propagate = False
output_logger.setLevel(logging.CRITICAL + 1)

#: Fields a record may carry, in the order JSON lines show them.
RUN_FIELDS = ("tenant", "job", "run_id", "trace_id", "span_id")


class RunContextFilter(logging.Filter):
    """Stamps each record with the run fields of the context that emitted it. Sits on handlers,
    so records from every logger are stamped, in the emitting task (a queue handler's thread
    would see no context)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = current()
        for key in ("tenant", "job", "run_id"):
            if not hasattr(record, key):
                setattr(record, key, fields.get(key))
        trace_id, span_id = tracing.current_ids()
        if trace_id is None and fields.get("run_id"):
            trace_id = tracing.trace_id_hex(fields["run_id"])
        record.trace_id = trace_id
        record.span_id = span_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, keys in a fixed order, no empty run fields."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.node:
            out["node"] = self.node
        for key in RUN_FIELDS:
            value = getattr(record, key, None)
            if value:
                out[key] = value
        stream = getattr(record, "stream", None)
        if stream:
            out["stream"] = stream
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


class ConsoleFormatter(logging.Formatter):
    """The plain text line, with the run it is about appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        tenant, job, run_id = (getattr(record, k, None) for k in ("tenant", "job", "run_id"))
        if not (tenant or job or run_id):
            return line
        parts = [f"{tenant or '?'}/{job}" if job else (tenant or "")]
        if run_id:
            parts.append(f"run={run_id}")
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            parts.append(f"trace={trace_id}")
        return f"{line} [{' '.join(p for p in parts if p)}]"


def formatter(fmt: str, node: str | None = None) -> logging.Formatter:
    """The formatter for `fmt` ("json" | "console"); InvalidInput naming `log_format` otherwise."""
    if fmt == "json":
        return JsonFormatter(node)
    if fmt == "console":
        return ConsoleFormatter()
    raise InvalidInput(f"unknown log format {fmt!r}; set KJOB_LOG_FORMAT to json or console", "log_format")


#: Loggers held at WARNING (or the configured level, if higher).
CHATTY_LIBRARIES = ("alembic", "httpx", "httpcore")


def setup(level: str = "INFO", fmt: str = "console", node: str | None = None) -> logging.Handler:
    """Configure the process's logging: one stderr handler on the root logger, replacing any
    handler an earlier `setup` installed. Returns the handler."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise InvalidInput(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR", "log_level")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt, node or socket.gethostname()))
    handler.addFilter(RunContextFilter())
    handler._kjob = True  # type: ignore[attr-defined]  # marks ours, so a second setup replaces it
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_kjob", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # Libraries that narrate at INFO: Alembic every migration step, httpx every request (one
    # line per Relay delivery); kjob logs what matters of both itself.
    for chatty in CHATTY_LIBRARIES:
        logging.getLogger(chatty).setLevel(max(numeric, logging.WARNING))
    return handler


def agent_output(stream: str, text: str) -> None:
    """One chunk of an agent's stdout or stderr, as read: one record per line, stamped with the
    run. A line longer than one chunk arrives as two records. Costs one level check when no
    sink is attached."""
    if not output_logger.isEnabledFor(logging.INFO):
        return
    for line in text.splitlines():
        output_logger.info(line, extra={"stream": stream})


def attach_output_file(path: Path, node: str | None = None) -> Callable[[], Awaitable[None]]:
    """Write agent output to `path` as JSON lines (appending), from a background thread so a
    slow disk never stalls the event loop. Returns the async function that detaches it and
    flushes what is queued."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(JsonFormatter(node or socket.gethostname()))
    lines: queue.SimpleQueue = queue.SimpleQueue()
    enqueue = logging.handlers.QueueHandler(lines)
    enqueue.addFilter(RunContextFilter())  # in the emitting task, where the run context is
    listener = logging.handlers.QueueListener(lines, file_handler)
    listener.start()
    output_logger.addHandler(enqueue)
    output_logger.setLevel(logging.INFO)

    async def detach() -> None:
        output_logger.removeHandler(enqueue)
        if not output_logger.handlers:
            output_logger.setLevel(logging.CRITICAL + 1)
        listener.stop()  # drains the queue first
        file_handler.close()

    return detach
