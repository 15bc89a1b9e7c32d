"""psycopg connections with a time limit on every answer from PostgreSQL. Apart from `engine`
so that an SQLite-only process does not import psycopg."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import errors as pg_errors

from codex_runner.store.engine import PG_ANSWER_TIMEOUT_SECONDS


class NoAnswer(psycopg.OperationalError):
    """PostgreSQL did not answer within the connection's `answer_timeout`; the connection is closed
    (its state is unknown). Not retried by `with_retries`: the next attempt would wait as long."""


class DeadlineConnection(psycopg.Connection[Any]):
    """A psycopg connection whose every exchange with the server has a time limit. psycopg waits
    for an answer for ever; its `wait` takes a timeout, which this class always passes. A server
    that keeps the socket open and never answers (SIGSTOP, a paused VM, a stuck proxy) would
    otherwise hang the request, heartbeat or claim that reached it until it answered again."""

    answer_timeout: float | None = PG_ANSWER_TIMEOUT_SECONDS

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        limit = timeout if timeout is not None else self.answer_timeout
        try:
            return super().wait(gen, interval, limit)
        except pg_errors._WaitTimeout:
            self.close()  # half an exchange: nothing more can be sent on it
            raise NoAnswer(f"the database did not answer within {limit:g} s; connection closed") from None
