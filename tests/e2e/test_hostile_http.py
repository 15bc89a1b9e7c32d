"""Hostile HTTP clients against a real `codex-runner serve` (uvicorn, httptools, uvloop): what a
client sends before its request reaches the app is bounded (api/connection.py)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_cli import Server, start_server, stop

RECV_TIMEOUT = 15


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("hostile"), enabled=False)
    try:
        yield srv
    finally:
        stop(srv.proc)


def _connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=RECV_TIMEOUT)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or the timeout fails the test)."""
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the server neither answered nor closed within {RECV_TIMEOUT} s: {out[:200]!r}")
        if not chunk:
            return out
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
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert _vm_rss_kib(server.proc.pid) - rss_before < 16 * 1024


def test_a_finished_head_over_the_cap_is_refused_too(server: Server) -> None:
    with _connect(server) as sock:
        _send_all(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * (100 * 1024) + b"\r\n\r\n")
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def test_a_large_head_under_the_cap_is_served_and_keeps_the_connection(server: Server) -> None:
    # 48 KiB of headers in 2 KiB ones, then a second request on the same connection.
    junk = b"".join(b"X-Junk-%d: " % i + b"a" * 2000 + b"\r\n" for i in range(24))
    with _connect(server) as sock:
        _send_all(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + junk + b"\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first[:200]
        _send_all(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + junk + b"\r\n")
        second = _read_all(sock)
    assert second.startswith(b"HTTP/1.1 200 "), second[:200]
