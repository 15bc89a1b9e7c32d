"""Hostile HTTP clients against a real `codex-runner serve` (uvicorn, httptools, uvloop): what a
client sends before its request reaches the app is bounded in size and in time
(api/connection.py)."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_cli import Server, serving
from tests.helpers import cli_token, connect_to, read_until_closed

RECV_TIMEOUT = 15
REQUEST_TIMEOUT = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(
        tmp_path_factory.mktemp("hostile"),
        enabled=False,
        RUNNER_HTTP_REQUEST_TIMEOUT_SECONDS=str(REQUEST_TIMEOUT),
    ) as srv:
        yield srv


def _connect(server: Server) -> socket.socket:
    return connect_to(server.url, RECV_TIMEOUT)


def _read_response(sock: socket.socket) -> bytes:
    """One answer with a Content-Length: its head may come in another segment than its body."""
    out = b""
    while True:
        head, sep, body = out.partition(b"\r\n\r\n")
        if sep:
            lengths = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
            if len(body) >= int(lengths[0].split(b":")[1]):
                return out
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection: {out[:200]!r}"
        out += chunk


def _send_all(sock: socket.socket, data: bytes) -> None:
    # The server may answer and close while we still send: that is the point.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def _vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_head_over_64_kib_is_refused_with_431_before_it_ends(server: Server) -> None:
    """A header that never ends was kept in memory whole: 3 connections of 200 MiB each grew the
    server by 700 MiB. Now the head stops at 64 KiB: 431, connection closed."""
    rss_before = _vm_rss_kib(server.proc.pid)
    with _connect(server) as sock:
        _send_all(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: ")
        for _ in range(32):  # 32 MiB, never finished
            _send_all(sock, b"a" * (1 << 20))
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert _vm_rss_kib(server.proc.pid) - rss_before < 16 * 1024


def test_a_finished_head_over_the_cap_is_refused_too(server: Server) -> None:
    with _connect(server) as sock:
        _send_all(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * (100 * 1024) + b"\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["code"] == "request_header_fields_too_large"  # JSON, as every API error


def test_a_large_head_under_the_cap_is_served_and_keeps_the_connection(server: Server) -> None:
    # 48 KiB of headers in 2 KiB ones, then a second request on the same connection.
    junk = b"".join(b"X-Junk-%d: " % i + b"a" * 2000 + b"\r\n" for i in range(24))
    with _connect(server) as sock:
        _send_all(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + junk + b"\r\n")
        first = _read_response(sock)
        assert first.startswith(b"HTTP/1.1 200 "), first[:200]
        _send_all(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + junk + b"\r\n")
        second = read_until_closed(sock)
    assert second.startswith(b"HTTP/1.1 200 "), second[:200]


def _closed_after(sock: socket.socket) -> float:
    """Seconds until the server closes the connection (what it sends before is ignored)."""
    start = time.monotonic()
    read_until_closed(sock)
    return time.monotonic() - start


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: x\r\n", id="half-a-head"),
        pytest.param(
            b"POST /api/runner/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{", id="half-a-body"
        ),
    ],
)
def test_a_request_that_does_not_arrive_whole_in_time_closes_the_connection(
    server: Server, sent: bytes
) -> None:
    """A connection that sent nothing, or part of a request, was kept for ever (uvicorn's keep-alive
    timer starts only after an answer): a few hundred of them took every file descriptor of a
    server, and /healthz went unanswered."""
    with _connect(server) as sock:
        _send_all(sock, sent)
        waited = _closed_after(sock)
    assert REQUEST_TIMEOUT - 0.5 <= waited < REQUEST_TIMEOUT + 5


def test_a_body_sent_after_its_answer_does_not_keep_the_connection(server: Server) -> None:
    """An answer may end before its request's body has come (a 413 for the Content-Length alone):
    the body that follows stopped the clock and uvicorn's keep-alive timer alike, and nothing
    started either again, so the connection was kept for ever."""
    size = 1024 * 1024 + 1  # over RUNNER_MAX_REQUEST_BYTES
    with _connect(server) as sock:
        _send_all(
            sock, b"POST /api/runner/jobs/x/cancel HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
        )
        assert _read_response(sock).startswith(b"HTTP/1.1 413 ")
        _send_all(sock, b"a" * size)
        waited = _closed_after(sock)
    assert waited < REQUEST_TIMEOUT + 5


def test_a_trickle_between_requests_does_not_keep_the_connection(server: Server) -> None:
    """uvicorn's keep-alive timer stops at any byte, and blank lines begin no request."""
    with _connect(server) as sock:
        _send_all(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
        start = time.monotonic()
        closed = False
        while time.monotonic() - start < REQUEST_TIMEOUT + 5:
            try:
                sock.sendall(b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sock.settimeout(0.25)
            try:
                if sock.recv(65536) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed


def test_a_long_answer_is_not_cut_by_the_request_timeout(server: Server, admin_token: str) -> None:
    """The clock runs only while a request is awaited: a log stream open longer than the timeout
    keeps going."""
    job = json.loads(_request(server, admin_token, "POST", "/api/runner/jobs", SUBMIT))
    with _connect(server) as sock:
        _send_all(
            sock,
            (
                f"GET /api/runner/jobs/{job['id']}/logs/stream HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {admin_token}\r\n\r\n"
            ).encode(),
        )
        sock.settimeout(REQUEST_TIMEOUT * 3)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.settimeout(0.5)
        deadline = time.monotonic() + REQUEST_TIMEOUT * 2
        while time.monotonic() < deadline:  # the job stays queued: the stream sends nothing more
            with contextlib.suppress(TimeoutError):
                assert sock.recv(65536) != b"", "the server closed the stream"


def test_requests_in_time_are_served(server: Server) -> None:
    with _connect(server) as sock:
        for _ in range(3):
            _send_all(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
            time.sleep(REQUEST_TIMEOUT / 2)


SUBMIT = {"repo": "demo", "script_key": "echo", "args": {"message": "hello"}}


@pytest.fixture(scope="module")
def admin_token(server: Server) -> str:
    return cli_token(server.env, server.root, "root")


def _request(server: Server, token: str, method: str, path: str, body: object) -> bytes:
    response = httpx.request(
        method, server.url + path, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert response.status_code < 300, response.text
    return response.content
