"""The fake Responses server on its own (no codex): turn choice, error modes, and a shutdown that
never waits for a hung request."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any

from tests.e2e.fake_responses import (
    FakeResponsesServer,
    cut_turn,
    error_turn,
    flaky,
    hang_turn,
    message_item,
    message_turn,
)


def post(server: FakeResponsesServer, body: dict[str, Any]) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("POST", "/v1/responses", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def sse_types(text: str) -> list[str]:
    return [json.loads(raw[6:])["type"] for raw in text.splitlines() if raw.startswith("data: ")]


def outputs(n: int) -> dict[str, Any]:
    return {"input": [{"type": "function_call_output", "call_id": str(i), "output": ""} for i in range(n)]}


def test_turn_is_chosen_by_tool_outputs_and_the_last_repeats() -> None:
    with FakeResponsesServer([message_turn("first"), message_turn("second")]) as server:
        answers = [post(server, outputs(n))[1] for n in (0, 0, 1, 5)]
    texts = [json.loads(a.split("response.output_item.done\ndata: ")[1].split("\n")[0]) for a in answers]
    assert [t["item"]["content"][0]["text"] for t in texts] == ["first", "first", "second", "second"]
    assert sse_types(answers[0]) == [
        "response.created",
        "response.output_item.added",
        "response.output_item.done",
        "response.completed",
    ]
    assert len(server.requests) == 4 and server.requests[2].body == outputs(1)


def test_error_modes() -> None:
    with FakeResponsesServer([error_turn(503)]) as server:
        assert post(server, {})[0] == 503
    with FakeResponsesServer([flaky(message_turn("ok"), failures=2)]) as server:
        assert [post(server, {})[0] for _ in range(3)] == [500, 500, 200]
    with FakeResponsesServer([cut_turn(message_item("half"))]) as server:
        status, text = post(server, {})
    assert status == 200 and "response.completed" not in sse_types(text)


def test_shutdown_does_not_wait_for_a_hung_request() -> None:
    server = FakeResponsesServer([hang_turn()]).__enter__()
    client = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    client.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    assert server.wait_for_requests(1, timeout=5)
    closer = threading.Thread(target=server.close)
    started = time.monotonic()
    closer.start()
    closer.join(timeout=5)
    assert not closer.is_alive()
    assert time.monotonic() - started < 2
    client.close()
