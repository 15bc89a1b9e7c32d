"""`serve` binds and listens on its address before anything starts (server.bind_listeners)."""

from __future__ import annotations

import socket

import pytest

from codex_runner.errors import ConfigError
from codex_runner.server import bind_listeners

from tests.helpers import free_port


def test_the_address_is_listened_on_at_once_so_a_second_serve_is_refused() -> None:
    """Bound with SO_REUSEADDR but not listening, a port could be bound by two `serve`s at once
    (Linux allows it until one listens): the second found out only after its launcher had started
    and claimed jobs, and died with a traceback."""
    port = free_port()
    first = bind_listeners("127.0.0.1", port)
    try:
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1 for s in first)
        with pytest.raises(ConfigError, match=f"RUNNER_PORT={port}: .*already in use"):
            bind_listeners("127.0.0.1", port)
    finally:
        for sock in first:
            sock.close()
