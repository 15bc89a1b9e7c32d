"""Reading a request body under the size cap, for the ASGI code that reads bodies itself: the
`BodySizeLimit` middleware (every route) and the create fast path (api/create.py)."""

from __future__ import annotations

from collections.abc import Iterable

from fastapi.responses import JSONResponse
from starlette.types import Message, Receive

from codex_runner.api.errors import error_response


class BodyTooLarge(Exception):
    """The body is over the cap (413)."""


def too_large_response(cap: int) -> JSONResponse:
    return error_response(413, f"request body over {cap} bytes", "payload_too_large")


def announced_over(headers: Iterable[tuple[bytes, bytes]], cap: int) -> bool:
    """True if a Content-Length header announces more than `cap` bytes (an unreadable one does not)."""
    for name, value in headers:
        if name == b"content-length":
            try:
                if int(value) > cap:
                    return True
            except ValueError:
                pass
    return False


async def read_capped(receive: Receive, cap: int) -> bytes | Message:
    """The whole body; or, if the client went away first, the message that says so. Raises
    `BodyTooLarge` as soon as more than `cap` bytes came, whether announced or streamed."""
    body = bytearray()
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return message
        body.extend(message.get("body", b""))
        if len(body) > cap:
            raise BodyTooLarge
        more = message.get("more_body", False)
    return bytes(body)
