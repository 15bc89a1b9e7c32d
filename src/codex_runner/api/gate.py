"""The bound on how many connections one HTTP server holds at once (`RUNNER_HTTP_MAX_CONNECTIONS`).

Every connection takes a file descriptor of the process, and so do a job's pipes, its log files and
the database's connections: without a bound a flood of connections (each one sending a request in
time, or a log stream each) could take them all. uvicorn's `limit_concurrency` answers 503 only once
a request has been read, and counts no idle keep-alive connection. The gate is asked in
`connection_made` (api/connection.py): over the cap, the connection is answered a 503 at once,
before its request, and closed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codex_runner.ops.metrics import Metrics

#: Refused connections whose 503 is still being delivered, at most, on top of the cap: past it, a
#: refused connection is closed without an answer. Each is held at most `REFUSED_LINGER_SECONDS`.
MAX_REFUSED_LINGERING = 64
#: How long a refused connection is held after its 503 for the client's request to arrive and be
#: dropped: closing a socket with unread bytes in it sends a reset, which makes the client's kernel
#: throw away the 503 it has not read yet. A client that read its answer closes first.
REFUSED_LINGER_SECONDS = 1.0
#: What the 503 tells a client to wait: a connection frees up as soon as any answer ends.
RETRY_AFTER_SECONDS = 1


@dataclass
class ConnectionGate:
    """Counts the connections of one server: `open` ones are served, `lingering` ones were refused
    and are being answered. Single-threaded (the server's event loop): no lock."""

    limit: int
    metrics: Metrics | None = None
    open: int = 0
    lingering: int = 0
    refused: int = 0
    # The 503 after its status line and the server's default headers (date, server).
    answer: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.answer = refusal(self.limit)

    def admit(self) -> bool:
        if self.open >= self.limit:
            self.refused += 1
            if self.metrics is not None:
                self.metrics.http_connections_refused.inc()
            return False
        self.open += 1
        if self.metrics is not None:
            self.metrics.http_connections.inc()
        return True

    def release(self) -> None:
        self.open -= 1
        if self.metrics is not None:
            self.metrics.http_connections.dec()

    def linger(self) -> bool:
        """True when one more refused connection may be held to deliver its 503."""
        if self.lingering >= MAX_REFUSED_LINGERING:
            return False
        self.lingering += 1
        return True

    def unlinger(self) -> None:
        self.lingering -= 1


def refusal(limit: int) -> bytes:
    """The 503 of a refused connection after its status line and the default headers: JSON like
    every API error (SPEC §4), with `Retry-After` so that clients (the CLI among them) take it as
    "not now"."""
    body = json.dumps(
        {
            "detail": f"the server holds its maximum of {limit} connections; retry shortly",
            "code": "unavailable",
        }
    ).encode()
    return b"".join(
        [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"retry-after: %d\r\n" % RETRY_AFTER_SECONDS,
            b"connection: close\r\n\r\n",
            body,
        ]
    )
