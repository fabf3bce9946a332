"""An attempt's output: kept up to a cap, counted beyond it, and streamed live as it is kept."""

from __future__ import annotations

import codecs
import logging
from typing import Any

from kjob.executor.sandbox.base import OutputSink

log = logging.getLogger(__name__)


class OutputCollector:
    """Collects stdout and stderr chunks, in arrival order, for one attempt.

    The first `cap_bytes` bytes are kept (and passed to the sink as they arrive); bytes past
    the cap are counted in `dropped_bytes`, so the Outcome says how much is missing. The live
    sink sees exactly what is kept: a runaway agent cannot flood the live log either.

    Text is decoded per stream with an incremental UTF-8 decoder, so a character split across
    two chunks is not mangled; bytes that are not UTF-8 become U+FFFD.
    """

    def __init__(self, cap_bytes: int, sink: OutputSink, run_id: str) -> None:
        self.cap_bytes = cap_bytes
        self.total_bytes = 0
        self.dropped_bytes = 0
        self._kept_bytes = 0
        self._parts: list[str] = []
        self._decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in ("stdout", "stderr")}
        self._sink: OutputSink | None = sink
        self._run_id = run_id

    async def feed(self, stream: str, data: bytes) -> None:
        """Take one chunk from `stream` ("stdout" | "stderr")."""
        self.total_bytes += len(data)
        keep = data[: max(self.cap_bytes - self._kept_bytes, 0)]
        self.dropped_bytes += len(data) - len(keep)
        if not keep:
            return
        self._kept_bytes += len(keep)
        text = self._decoders[stream].decode(keep)
        if text:
            await self._emit(stream, text)

    async def _emit(self, stream: str, text: str) -> None:
        self._parts.append(text)
        if self._sink is None:
            return
        try:
            await self._sink(stream, text)
        except Exception:
            # The sink is the executor's live log; the attempt and its kept output matter more.
            # One warning, then no more calls, so a broken sink cannot flood the log.
            log.warning("run %s: the live output sink failed; output is still kept", self._run_id, exc_info=True)
            self._sink = None

    async def finish(self) -> dict[str, Any]:
        """Flush partial characters; return the Outcome fields `output`, `output_bytes`, `dropped_bytes`."""
        for stream, decoder in self._decoders.items():
            tail = decoder.decode(b"", final=True)
            if tail:
                await self._emit(stream, tail)
        return {"output": "".join(self._parts), "output_bytes": self.total_bytes, "dropped_bytes": self.dropped_bytes}
