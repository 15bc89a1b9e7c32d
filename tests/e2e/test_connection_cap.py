"""RUNNER_HTTP_MAX_CONNECTIONS against a real `codex-runner serve` (uvicorn, httptools, uvloop): one
connection over the cap is answered 503 at once and closed, and the count stays exact however
connections end (api/gate.py)."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from codex_runner.config import load_settings
from codex_runner.ops.fdlimit import fds_needed

from tests.e2e.test_cli import Server, serving, start_server, stop
from tests.helpers import cli_token, connect_to, read_until_closed, wait_until

pytestmark = pytest.mark.timeout(120)

CAP = 8
RECV_TIMEOUT = 10
# How fast a refused connection must hear its 503: at once, not after a request timeout.
PROMPT = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The request timeout far above the test's length: idle connections stay until closed here.
    with serving(
        tmp_path_factory.mktemp("conncap"),
        enabled=False,
        RUNNER_HTTP_MAX_CONNECTIONS=str(CAP),
        RUNNER_HTTP_REQUEST_TIMEOUT_SECONDS="300",
    ) as srv:
        yield srv


def _connect(server: Server) -> socket.socket:
    return connect_to(server.url, RECV_TIMEOUT)


def _request(server: Server, path: str = "/healthz") -> bytes:
    """One request on a new connection; everything the server answers until it closes."""
    with _connect(server) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return read_until_closed(sock)


def _assert_refused(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer[:300]
    lines = head.lower().split(b"\r\n")
    assert b"retry-after: 1" in lines and b"connection: close" in lines
    assert b"content-type: application/json" in lines
    assert json.loads(body) == {
        "detail": f"the server holds its maximum of {CAP} connections; retry shortly",
        "code": "unavailable",
    }


def _still_open(sock: socket.socket) -> bool:
    """True when the server has sent nothing on `sock` and not closed it: a held connection."""
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(RECV_TIMEOUT)
    return False


@contextlib.contextmanager
def _idle(server: Server, count: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(_connect(server))
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _served(server: Server) -> bool:
    return _request(server).startswith(b"HTTP/1.1 200 ")


def test_one_connection_over_the_cap_is_refused_at_once(server: Server) -> None:
    with _idle(server, CAP) as held:
        start = time.monotonic()
        answer = _request(server)
        waited = time.monotonic() - start
        _assert_refused(answer)
        assert waited < PROMPT
        # The server accepts in order: the held ones were taken before the refused one.
        assert all(_still_open(sock) for sock in held)
        # /healthz of a load balancer is refused too while the server is full (then it is).
        _assert_refused(_request(server))
    # Below the cap again once the client closed them: served at once.
    assert wait_until(lambda: _served(server), timeout=10)


def test_a_refused_client_that_sent_its_request_reads_the_503_to_a_clean_end(server: Server) -> None:
    """Closed at once, a refused connection whose request had come (or came after) was reset:
    the client saw "connection reset" instead of the 503, or after it. The server shuts its side
    and drops what the client still sends until the client closes."""
    request = b"POST /api/runner/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 30000\r\n\r\n" + b"x" * 30000
    with _idle(server, CAP):
        refused = []
        for _ in range(20):
            sock = _connect(server)
            refused.append(sock)
            sock.sendall(request)
        for sock in refused:
            with sock:
                out = b""
                while chunk := sock.recv(65536):  # a reset raises ConnectionResetError
                    out += chunk
                _assert_refused(out)


def test_refused_connections_being_answered_are_bounded_too(server: Server) -> None:
    """A refused connection is held for its 503 until the client closes, at most 1 s: past 64 of
    them at once, one more is closed without an answer; a client that never closes is let go."""
    with _idle(server, CAP), _idle(server, 200) as refused:
        answers = [read_until_closed(sock) for sock in refused]  # the client keeps them open
        assert sum(answer.startswith(b"HTTP/1.1 503 ") for answer in answers) >= 64
        assert answers.count(b"") >= 1
        # The server let them go after 1 s: a refused connection is answered again.
        assert wait_until(lambda: _request(server).startswith(b"HTTP/1.1 503 "), timeout=10)


def test_the_count_is_exact_after_closes_and_refusals(server: Server) -> None:
    """Closing some of the held connections frees exactly that many places, again and again."""
    with _idle(server, CAP) as held:
        for _ in range(3):
            for _ in range(5):
                _assert_refused(_request(server))
            for sock in held[:3]:
                sock.close()
            del held[:3]
            assert wait_until(lambda: _served(server), timeout=10)
            held += [_connect(server) for _ in range(3)]
            # Exactly 3 places were free: the next is refused, and the 3 new ones are held.
            _assert_refused(_request(server))
            assert all(_still_open(sock) for sock in held)


def test_connections_the_server_ends_give_their_place_back(server: Server) -> None:
    """A 431 (head too large), a 400 (not HTTP) or an answer with `Connection: close`: each
    connection that the server closes itself counts no more."""
    for _ in range(3 * CAP):
        with _connect(server) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * (80 * 1024) + b"\r\n\r\n")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 431 ")
        with _connect(server) as sock:
            sock.sendall(b"\x16\x03\x01 not http\r\n\r\n")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 400 ")
        assert _served(server)
    # The server sees each close a moment after the client: wait until all are counted out.
    assert wait_until(lambda: _fills_at(server, CAP), timeout=10)


def _fills_at(server: Server, count: int) -> bool:
    """True when exactly `count` idle connections are held and the next is refused."""
    with _idle(server, count) as held:
        refused = _request(server)
        return refused.startswith(b"HTTP/1.1 503 ") and all(_still_open(sock) for sock in held)


def test_a_websocket_upgrade_keeps_the_count(server: Server) -> None:
    """The API has no websocket: an upgrade request is answered as any other, and its connection
    (which would otherwise pass to a websocket protocol that does not count it) is counted out."""
    upgrade = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    answers = []
    for _ in range(CAP + 2):
        with _connect(server) as sock:
            sock.sendall(upgrade)
            answers.append(read_until_closed(sock))
    assert wait_until(lambda: _fills_at(server, CAP), timeout=10)
    assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers), answers[0][:200]
    # Nor does each one log uvicorn's advice to install a websocket library.
    assert "WebSocket" not in server.log.read_text()


def test_metrics_count_open_and_refused_connections(server: Server) -> None:
    token = cli_token(server.env, server.root, "root")
    scrapes_refused = 0

    def sample(name: str) -> float | None:
        """The value in a scrape, or None when the scrape itself was refused (still full)."""
        nonlocal scrapes_refused
        answer = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        if answer.status_code == 503:
            scrapes_refused += 1
            return None
        found = re.search(rf"^{re.escape(name)} (\S+)$", answer.text, re.MULTILINE)
        assert found, f"{name} not in /metrics"
        return float(found.group(1))

    # Only the scrape's own connection is open between tests.
    assert wait_until(lambda: sample("runner_http_connections") == 1, timeout=10)
    refused = sample("runner_http_connections_refused_total")
    assert refused is not None
    with _idle(server, CAP - 1):
        assert sample("runner_http_connections") == CAP  # the 7 held and the scrape
    with _idle(server, CAP):
        _assert_refused(_request(server))
        _assert_refused(_request(server))
    assert wait_until(lambda: sample("runner_http_connections") == 1, timeout=10)
    assert sample("runner_http_connections_refused_total") == refused + 2 + scrapes_refused


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(
        tmp_path_factory.mktemp("conncap-timeout"),
        enabled=False,
        RUNNER_HTTP_MAX_CONNECTIONS=str(CAP),
        RUNNER_HTTP_REQUEST_TIMEOUT_SECONDS="2",
    ) as srv:
        yield srv


def test_connections_closed_by_the_request_timeout_give_their_place_back(impatient: Server) -> None:
    for _ in range(2):
        with _idle(impatient, CAP) as held:
            _assert_refused(_request(impatient))
            for sock in held:
                assert read_until_closed(sock) == b""  # closed by the server, without an answer
        assert wait_until(lambda: _served(impatient), timeout=10)


def _open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no Max open files")


def test_serve_raises_its_soft_open_file_limit_for_the_cap(tmp_path: Path) -> None:
    """A soft limit of 512 (inherited) under the default cap's needs: `serve` raises its own as far
    as the cap needs and says so in its log."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip("hard open-file limit under 2048")
    # The child inherits the limits of this process when it starts: lowered for that moment only.
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        srv = start_server(tmp_path, enabled=False)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert _open_files_limit(srv.proc.pid) == (fds_needed(load_settings(srv.env, cwd=srv.root)), hard)
        assert "fd_limit_raised" in srv.log.read_text()
    finally:
        stop(srv.proc)
