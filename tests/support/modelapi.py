"""ModelAPI: a loopback model server speaking the real wire protocols, with scripted replies.

The agent CLIs under test (claude, codex, llm) talk to it exactly as they talk to their
vendors' APIs:

    POST /v1/messages            Anthropic Messages, SSE when `stream` is true (claude)
    POST /v1/responses           OpenAI Responses, SSE (codex)
    POST /v1/chat/completions    OpenAI Chat Completions, SSE when `stream` is true (llm, ...)

Each model call takes the next scripted Reply; when the script is spent, `default` answers:

    with ModelAPI(default=Reply.answer("all quiet")) as api:
        api.script(Reply.call("Bash", {"command": "echo hi"}), Reply.answer("done", input_tokens=50))
        ... ANTHROPIC_BASE_URL=api.url ...
        assert api.calls("/v1/messages")

Side calls an agent makes on its own (token counting, a title from a small model) are
answered too and recorded, but take no scripted reply: only requests that carry the job's
conversation do (see `_is_side_call`).
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "claude-sonnet-4-5-20250929"


@dataclass(frozen=True)
class Reply:
    """One model turn: a text answer, or a tool call that makes the agent come back."""

    text: str = ""
    tool: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    input_tokens: int = 100
    output_tokens: int = 20

    @classmethod
    def answer(cls, text: str, **usage: int) -> "Reply":
        return cls(text=text, **usage)

    @classmethod
    def call(cls, tool: str, arguments: dict[str, Any], **usage: int) -> "Reply":
        return cls(tool=tool, arguments=arguments, **usage)


@dataclass(frozen=True)
class Call:
    path: str
    body: Any
    headers: dict[str, str]
    scripted: bool  #: took a scripted reply (a turn of the job's conversation)


class ModelAPI:
    def __init__(self, default: Reply | None = None) -> None:
        self.default = default or Reply.answer("nothing scripted")
        self._lock = threading.Lock()
        self._script: list[Reply] = []
        self._calls: list[Call] = []
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- scripting ------------------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._script.extend(replies)

    def calls(self, path: str | None = None, scripted: bool = True) -> list[Call]:
        with self._lock:
            return [c for c in self._calls if (path is None or c.path == path) and (c.scripted or not scripted)]

    def _next(self) -> Reply:
        with self._lock:
            return self._script.pop(0) if self._script else self.default

    def _record(self, call: Call) -> None:
        with self._lock:
            self._calls.append(call)

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):06d}"

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "ModelAPI not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "ModelAPI":
        api = self

        class Handler(_Handler):
            owner = api

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="modelapi", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "ModelAPI":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_side_call(path: str, body: dict[str, Any]) -> bool:
    """A request the agent makes for itself, not a turn of the job: claude's token counting
    and its small-model helpers (no tools offered), codex's or llm's none."""
    if path.endswith("/count_tokens"):
        return True
    if path == "/v1/messages":
        return not body.get("tools")
    return False


class _Handler(BaseHTTPRequestHandler):
    owner: ModelAPI
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._json(200, {})

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path.endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "type": "model"}]})
            return
        self._json(404, {"error": {"type": "not_found_error", "message": f"no route {path}"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._json(400, {"error": {"type": "invalid_request_error", "message": "body is not JSON"}})
            return
        path = self.path.split("?")[0]
        side = _is_side_call(path, body)
        self.owner._record(Call(path, body, {k.lower(): v for k, v in self.headers.items()}, not side))
        if path.endswith("/count_tokens"):
            self._json(200, {"input_tokens": 10})
            return
        reply = Reply.answer("ok", input_tokens=5, output_tokens=1) if side else self.owner._next()
        if path == "/v1/messages":
            self._anthropic(body, reply)
        elif path == "/v1/responses":
            self._responses(body, reply)
        elif path == "/v1/chat/completions":
            self._chat(body, reply)
        else:
            self._json(404, {"error": {"type": "not_found_error", "message": f"no route {path}"}})

    # -- Anthropic Messages ---------------------------------------------------------------

    def _anthropic(self, body: dict[str, Any], reply: Reply) -> None:
        model = body.get("model") or MODEL
        msg_id = self.owner._id("msg")
        if reply.tool:
            block = {"type": "tool_use", "id": self.owner._id("toolu"), "name": reply.tool, "input": reply.arguments}
            stop = "tool_use"
        else:
            block = {"type": "text", "text": reply.text}
            stop = "end_turn"
        usage = {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        if not body.get("stream"):
            self._json(200, {"id": msg_id, "type": "message", "role": "assistant", "model": model,
                             "content": [block], "stop_reason": stop, "stop_sequence": None, "usage": usage})
            return
        start_block = {**block, "input": {}} if reply.tool else {"type": "text", "text": ""}
        delta = ({"type": "input_json_delta", "partial_json": json.dumps(reply.arguments)} if reply.tool
                 else {"type": "text_delta", "text": reply.text})
        events = [
            ("message_start", {"type": "message_start", "message": {
                "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 1}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": start_block}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                               "usage": {"output_tokens": reply.output_tokens}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        self._sse(events)

    # -- OpenAI Responses -----------------------------------------------------------------

    def _responses(self, body: dict[str, Any], reply: Reply) -> None:
        resp_id = self.owner._id("resp")
        model = body.get("model") or "gpt-5"
        if reply.tool:
            item = {"type": "function_call", "id": self.owner._id("fc"), "call_id": self.owner._id("call"),
                    "name": reply.tool, "arguments": json.dumps(reply.arguments), "status": "completed"}
        else:
            item = {"type": "message", "id": self.owner._id("msg"), "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": reply.text, "annotations": []}]}
        usage = {"input_tokens": reply.input_tokens, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": reply.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": reply.input_tokens + reply.output_tokens}
        response = {"id": resp_id, "object": "response", "model": model, "status": "in_progress", "output": []}
        events: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"type": "response.created", "response": response}),
            ("response.output_item.added", {"type": "response.output_item.added", "output_index": 0,
                                            "item": {**item, "status": "in_progress"}}),
        ]
        if not reply.tool:
            events.append(("response.output_text.delta", {"type": "response.output_text.delta", "item_id": item["id"],
                                                          "output_index": 0, "content_index": 0, "delta": reply.text}))
        events += [
            ("response.output_item.done", {"type": "response.output_item.done", "output_index": 0, "item": item}),
            ("response.completed", {"type": "response.completed", "response": {
                **response, "status": "completed", "output": [item], "usage": usage}}),
        ]
        self._sse(events)

    # -- OpenAI Chat Completions ----------------------------------------------------------

    def _chat(self, body: dict[str, Any], reply: Reply) -> None:
        chat_id = self.owner._id("chatcmpl")
        model = body.get("model") or "gpt-4o-mini"
        usage = {"prompt_tokens": reply.input_tokens, "completion_tokens": reply.output_tokens,
                 "total_tokens": reply.input_tokens + reply.output_tokens}
        if reply.tool:
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [{
                "id": self.owner._id("call"), "type": "function",
                "function": {"name": reply.tool, "arguments": json.dumps(reply.arguments)}}]}
            finish = "tool_calls"
        else:
            message, finish = {"role": "assistant", "content": reply.text}, "stop"
        base = {"id": chat_id, "created": 1767225600, "model": model}
        if not body.get("stream"):
            self._json(200, {**base, "object": "chat.completion", "usage": usage,
                             "choices": [{"index": 0, "message": message, "finish_reason": finish}]})
            return
        chunk = {**base, "object": "chat.completion.chunk"}
        data = [
            {**chunk, "choices": [{"index": 0, "delta": message, "finish_reason": None}]},
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
        ]
        if (body.get("stream_options") or {}).get("include_usage"):
            data.append({**chunk, "choices": [], "usage": usage})
        self._sse([(None, d) for d in data], done=True)

    # -- wire -----------------------------------------------------------------------------

    def _sse(self, events: list[tuple[str | None, dict[str, Any]]], done: bool = False) -> None:
        out = []
        for name, data in events:
            if name:
                out.append(f"event: {name}\n")
            out.append(f"data: {json.dumps(data)}\n\n")
        if done:
            out.append("data: [DONE]\n\n")
        payload = "".join(out).encode()
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _json(self, status: int, body: Any) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
