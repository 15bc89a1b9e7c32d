"""uvicorn's httptools protocol with the bounds it lacks on what a client sends before its request.

uvicorn (httptools) keeps a request's head — request line and headers — in memory until it ends,
however long: one connection sending a header of 200 MiB and never finishing it held 200 MiB of
the server (uvicorn's h11 protocol stops at 16 KiB; httptools has no such cap). Nor does uvicorn
time out a connection before its first request, or a request that trickles in: a connection that
sent nothing, or half a head, was kept for ever, and a few hundred of them took every file
descriptor the server had (`/healthz` then went unanswered, as would a job's log and pipes). Nor
does it bound how many connections it holds (api/gate.py). `serve` and a worker's metrics port use
`protocol_class(...)` instead (`http=` of `uvicorn.Config`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from codex_runner.api.gate import REFUSED_LINGER_SECONDS, ConnectionGate

if TYPE_CHECKING:
    from codex_runner.ops.metrics import Metrics

#: The most bytes a request's head may take (request line and headers): far above any real one
#: (a token is at most 4 KiB, api/auth.py), as nginx's 4 × 8 KiB, and a bound on what one
#: connection holds before the app sees its request. Over it: 431 and the connection closed.
MAX_HEAD_BYTES = 64 * 1024


class HeadTooLarge(Exception):
    """Raised from a parser callback to stop the parser: httptools turns it into the parse error on
    which uvicorn answers 400, which `send_400_response` makes a 431."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` that refuses a head over `MAX_HEAD_BYTES`: a finished one by the size of
    its parts, an unfinished one (httptools keeps a header whole until it ends) by the bytes that
    came since it began; and closes a connection whose next request has not come whole (head and
    body) within `request_timeout` seconds of the connection opening or the last answer ending.
    An answer under way (a log stream) is never cut: the clock runs only while a request is awaited.

    uvicorn's own keep-alive timeout (5 s) still closes a connection idle between requests; but
    any byte stops that timer, and a blank line between requests begins no message, so it alone
    let a client that trickles keep a connection for ever."""

    request_timeout: float = 60.0
    # The server's count of connections (one per `protocol_class` call); None: no cap.
    gate: ConnectionGate | None = None
    # This connection holds one of the gate's places, until `connection_lost` gives it back.
    _admitted = False
    # Over the cap: answered 503 and closed; `_lingering` while the 503 is being delivered.
    _refused = False
    _lingering = False
    _linger_end: asyncio.TimerHandle | None = None
    # Waiting for a request, or for the rest of one; and the timer that ends the wait.
    _receiving = False
    _deadline: asyncio.TimerHandle | None = None

    # Bytes received since the current head began; None once its headers are complete (the body
    # and the answer are not counted).
    _head_bytes: int | None = 0
    # The size of the current head's request line and headers, as the parser hands them over.
    _head_size = 0
    _head_too_large = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.gate is not None:
            if not self.gate.admit():
                self._refuse_connection(transport)
                return
            self._admitted = True
        super().connection_made(transport)
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            self._end_refusal()
            return
        # First: asyncio calls this once for every connection made, however it ended (our own
        # timeout, a 431, the client), so the count stays exact whatever follows.
        self._give_back()
        self._stop_clock()
        super().connection_lost(exc)

    def _give_back(self) -> None:
        if self._admitted and self.gate is not None:
            self._admitted = False
            self.gate.release()

    def _refuse_connection(self, transport: asyncio.Transport) -> None:
        """Answers 503 before any request and closes: the cheapest answer a client still
        understands. The write side is shut at once; what the client sends meanwhile is dropped,
        for at most `REFUSED_LINGER_SECONDS` (see api/gate.py)."""
        assert self.gate is not None
        self._refused = True
        self.transport = transport
        if not self.gate.linger():
            transport.close()
            return
        self._lingering = True
        transport.write(
            b"".join(
                [
                    STATUS_LINE[503],
                    *(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers),
                    self.gate.answer,
                ]
            )
        )
        if transport.can_write_eof():
            transport.write_eof()
        self._linger_end = self.loop.call_later(REFUSED_LINGER_SECONDS, transport.close)

    def _end_refusal(self) -> None:
        if self._linger_end is not None:
            self._linger_end.cancel()
            self._linger_end = None
        if self._lingering and self.gate is not None:
            self._lingering = False
            self.gate.unlinger()

    def _await_request(self) -> None:
        """Starts the clock, unless it runs already (a request begun before the last answer ended
        keeps the time it had)."""
        if not self._receiving:
            self._receiving = True
            self._deadline = self.loop.call_later(self.request_timeout, self._request_timed_out)

    def _stop_clock(self) -> None:
        self._receiving = False
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _request_timed_out(self) -> None:
        self._deadline = None
        if self._receiving and not self.transport.is_closing():
            # The app, if it waits for the body, hears a disconnect.
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = 0
        if self._head_bytes is None:
            self._head_bytes = 0
        self._await_request()  # a pipelined request, begun while an answer is under way

    def on_message_complete(self) -> None:
        self._stop_clock()
        super().on_message_complete()
        cycle = self.cycle
        if (
            cycle is not None
            and cycle.response_complete
            and not (self.parser.should_upgrade() and self._should_upgrade())
            and not self.transport.is_closing()
        ):
            # Its answer ended before the body did (a 413 for the Content-Length alone): the next
            # request is awaited from now. The body's bytes stopped uvicorn's keep-alive timer, and
            # `on_response_complete`, which starts the clock, came while the clock still ran.
            self._await_request()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._await_request()

    def _unsupported_upgrade_warning(self) -> None:
        """Silent: the API has no websocket (`ws="none"`), an upgrade request is answered as any
        other, and uvicorn's two warnings a request (one that says to install a websocket library)
        would let any client fill the service log."""

    def handle_websocket_upgrade(self) -> None:
        # The connection is the websocket protocol's now: this one hears no `connection_lost`.
        # (`serve` passes `ws="none"`: the API has no websocket.)
        self._stop_clock()
        self._give_back()
        super().handle_websocket_upgrade()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._head_size += len(name) + len(value) + 4
        self._check_head_size()

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self._check_head_size()  # a long URL
        super().on_headers_complete()

    def _check_head_size(self) -> None:
        if self._head_size > MAX_HEAD_BYTES:
            self._head_too_large = True
            raise HeadTooLarge

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the request of a refused connection, dropped
        if self._head_bytes is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._head_bytes is not None and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse_head()

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def _refuse_head(self) -> None:
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            # JSON like every error of the API (SPEC §4), its code named after the status.
            msg = b'{"detail": "request head over 64 KiB", "code": "request_header_fields_too_large"}'
            self.transport.write(
                b"".join(
                    [
                        STATUS_LINE[431],
                        *(
                            name + b": " + value + b"\r\n"
                            for name, value in self.server_state.default_headers
                        ),
                        b"content-type: application/json\r\n",
                        b"content-length: " + str(len(msg)).encode("ascii") + b"\r\n",
                        b"connection: close\r\n\r\n",
                        msg,
                    ]
                )
            )
        # Else an answer is under way on this connection (a pipelined head behind it): no room
        # for another, the connection just closes.
        self.transport.close()


def protocol_class(
    request_timeout: float, max_connections: int | None = None, metrics: Metrics | None = None
) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for `uvicorn.Config(http=...)`, which constructs it without our settings;
    one per server, for its connections have a count of their own."""
    gate = None if max_connections is None else ConnectionGate(max_connections, metrics)
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"request_timeout": float(request_timeout), "gate": gate},
    )
