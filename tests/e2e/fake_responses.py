"""A scripted fake of the OpenAI Responses API, enough for the real `codex` binary to run offline.

codex 0.169 sends `POST <base_url>/responses` with `stream: true` and reads a `text/event-stream`
of `response.*` events, finished by `response.completed`. Each scripted `Turn` answers one model
request of codex's turn. The turn is chosen by how many tool outputs (input items whose type ends in `_call_output`)
the request already carries, not by counting requests: codex retries failed requests with the same
input, and a retry must get the same answer. When the script runs out, its last turn repeats, so an
error turn keeps failing however often codex retries.

Usage::

    with FakeResponsesServer([shell_turn("echo hi"), patch_turn(PATCH), message_turn("done")]) as server:
        ... point codex at server.base_url ...
        server.requests  # every request seen: path, headers, parsed JSON body
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

Mode = Literal["stream", "http_error", "cut", "hang", "raw"]

_ids = itertools.count(1)


def _next_id(prefix: str) -> str:
    return f"{prefix}_{next(_ids)}"


@dataclass(frozen=True)
class Turn:
    """One scripted answer. `items` are Responses output items, each streamed as
    `response.output_item.done`; `mode` says how the answer ends."""

    items: tuple[dict[str, Any], ...] = ()
    mode: Mode = "stream"
    status: int = 500
    # Answer the first `fail_first` requests for this turn with HTTP `status`, then normally:
    # codex's own retry path, seen from the server.
    fail_first: int = 0
    # mode "raw": the response body, sent as it is after the headers of an event stream.
    raw: bytes = b""
    usage: dict[str, Any] = field(
        default_factory=lambda: {
            "input_tokens": 1200,
            "input_tokens_details": {"cached_tokens": 200},
            "output_tokens": 80,
            "output_tokens_details": {"reasoning_tokens": 10},
            "total_tokens": 1280,
        }
    )


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    raw_body: bytes


def message_item(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "role": "assistant",
        "id": _next_id("msg"),
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def function_call_item(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": _next_id("fc"),
        "call_id": _next_id("call"),
        "name": name,
        "arguments": json.dumps(arguments),
        "status": "completed",
    }


def custom_tool_call_item(name: str, tool_input: str) -> dict[str, Any]:
    return {
        "type": "custom_tool_call",
        "id": _next_id("ctc"),
        "call_id": _next_id("call"),
        "name": name,
        "input": tool_input,
        "status": "completed",
    }


def shell_turn(cmd: str) -> Turn:
    """The model runs `cmd` through codex's `exec_command` tool (codex wraps it in `bash -lc`)."""
    return Turn(items=(function_call_item("exec_command", {"cmd": cmd}),))


def patch_turn(patch: str) -> Turn:
    """The model edits files with codex's freeform `apply_patch` tool (`*** Begin Patch` ...)."""
    return Turn(items=(custom_tool_call_item("apply_patch", patch),))


def message_turn(text: str) -> Turn:
    return Turn(items=(message_item(text),))


def items_turn(*items: dict[str, Any]) -> Turn:
    return Turn(items=tuple(items))


def error_turn(status: int = 500) -> Turn:
    return Turn(mode="http_error", status=status)


def flaky(turn: Turn, failures: int = 1, status: int = 500) -> Turn:
    """`turn`, after `failures` answers of HTTP `status`."""
    return replace(turn, fail_first=failures, status=status)


def cut_turn(*items: dict[str, Any]) -> Turn:
    """Streams `items`, then closes the connection without `response.completed`."""
    return Turn(items=tuple(items), mode="cut")


def raw_turn(body: bytes) -> Turn:
    """Answers with `body` as the event stream, byte for byte: broken or hostile model output."""
    return Turn(mode="raw", raw=body)


def hang_turn() -> Turn:
    """Accepts the request and never answers, until the client goes away or the server stops."""
    return Turn(mode="hang")


def tool_outputs_in(body: Any) -> int:
    if not isinstance(body, dict) or not isinstance(body.get("input"), list):
        return 0
    return sum(
        1
        for item in body["input"]
        if isinstance(item, dict) and str(item.get("type", "")).endswith("_call_output")
    )


class FakeResponsesServer:
    """Serves scripted turns on 127.0.0.1 from a background thread; use as a context manager."""

    def __init__(self, turns: list[Turn]) -> None:
        if not turns:
            raise ValueError("at least one turn is needed")
        self.turns = turns
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._attempts: dict[int, int] = {}
        self._stopping = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-responses", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def responses_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.path.endswith("/responses")]

    def wait_for_requests(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.responses_requests()) >= count:
                return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> FakeResponsesServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # Hanging handlers watch `_stopping`, so shutdown never waits on a client that stays connected.
        self._stopping.set()
        if self._thread.is_alive():
            # shutdown() waits for serve_forever(), which never ran if the server was never entered.
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _turn_for(self, body: Any) -> tuple[Turn, int]:
        """The scripted turn for this request, and how many times it was asked for before."""
        index = min(tool_outputs_in(body), len(self.turns) - 1)
        with self._lock:
            attempt = self._attempts.get(index, 0)
            self._attempts[index] = attempt + 1
        return self.turns[index], attempt


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # A hung handler must not make server_close() wait for it.
    block_on_close = False
    fake: FakeResponsesServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _record(self, raw: bytes) -> Any:
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.server.fake._record(
            RecordedRequest(
                self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body, raw
            )
        )
        return body

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._record(b"")
        self._send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self) -> None:
        raw = self._read_body()
        body = self._record(raw)
        if not self.path.endswith("/responses"):
            self._send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
            return
        turn, attempt = self.server.fake._turn_for(body)
        if turn.mode == "http_error" or attempt < turn.fail_first:
            self._send_json(
                turn.status,
                {"error": {"message": f"fake server error {turn.status}", "type": "server_error"}},
            )
            return
        if turn.mode == "hang":
            self._hang()
            return
        self._stream(turn)

    def _hang(self) -> None:
        stopping = self.server.fake._stopping
        self.connection.settimeout(0.2)
        while not stopping.is_set():
            try:
                if self.connection.recv(1, 0) == b"":
                    return  # the client hung up
            except TimeoutError:
                continue
            except OSError:
                return
        self.close_connection = True

    def _stream(self, turn: Turn) -> None:
        response_id = _next_id("resp")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        # No length and no chunking: the body ends when the connection closes, which is also how
        # the "cut" mode ends a stream early.
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if turn.mode == "raw":
            try:
                self.wfile.write(turn.raw)
                self.wfile.flush()
            except OSError:
                pass
            return
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": {"id": response_id, "status": "in_progress"}}
        ]
        for index, item in enumerate(turn.items):
            events.append({"type": "response.output_item.added", "output_index": index, "item": item})
            events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        if turn.mode == "stream":
            events.append(
                {
                    "type": "response.completed",
                    "response": {
                        "id": response_id,
                        "status": "completed",
                        "output": list(turn.items),
                        "usage": turn.usage,
                    },
                }
            )
        try:
            for event in events:
                self.wfile.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
        except OSError:
            return


def iter_tool_names(request: RecordedRequest) -> Iterator[tuple[str, str]]:
    """(type, name) of every tool the request offers the model."""
    body = request.body if isinstance(request.body, dict) else {}
    for tool in body.get("tools") or []:
        if isinstance(tool, dict):
            yield str(tool.get("type")), str(tool.get("name") or tool.get("type"))
