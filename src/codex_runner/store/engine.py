"""Engines for SQLite (WAL, busy timeout, foreign keys) and PostgreSQL (psycopg 3), and the retry
policy for transient database errors."""

from __future__ import annotations

import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from codex_runner.errors import StoreUnavailable

T = TypeVar("T")

# SPEC issue 6: 5 attempts from 100 ms, under 3 s in all.
RETRY_ATTEMPTS = 5
RETRY_FIRST_DELAY = 0.1
# How long an SQLite writer waits for the write lock before "database is locked".
SQLITE_BUSY_TIMEOUT_SECONDS = 30


def normalise_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here; SQLAlchemy would otherwise pick psycopg2."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("postgres://"):
        return "postgresql+psycopg://" + url[len("postgres://") :]
    return url


def create_store_engine(url: str, *, pool_size: int = 10) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        db_path = sa.engine.make_url(url).database
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
            pool_size=pool_size,
            max_overflow=pool_size,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
            # Take over transaction control from pysqlite so that writers can BEGIN IMMEDIATE.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            # Sorts and statement journals in memory, not in files created and deleted in $TMPDIR
            # a few times a second under load (on ext4 every new file's inode search skips the
            # recently deleted ones: docs/performance.md, "Dispatch").
            cur.execute("PRAGMA temp_store=MEMORY")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # Writers take the write lock up front: a deferred transaction that reads and then
            # writes fails with SQLITE_BUSY_SNAPSHOT under WAL instead of waiting its turn.
            mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    return sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        # A session idle inside a transaction (a frozen instance) lets its locks go after 30 s.
        connect_args={"connect_timeout": 5, "options": "-c idle_in_transaction_session_timeout=30000"},
    )


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: SQLite busy/locked, PostgreSQL serialization/deadlock failures and
    dropped or refused connections."""
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
        if isinstance(orig, sqlite3.OperationalError):
            text = str(orig).lower()
            return "locked" in text or "busy" in text
        sqlstate = getattr(orig, "sqlstate", None)
        if sqlstate in {"40001", "40P01", "57P01", "57P02", "57P03", "08000", "08003", "08006", "08001"}:
            return True
        if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
            return True
    return False


def with_retries(
    fn: Callable[[], T], *, attempts: int = RETRY_ATTEMPTS, first_delay: float = RETRY_FIRST_DELAY
) -> T:
    """Runs `fn` (one whole transaction) again on transient errors with exponential backoff:
    0.1 + 0.2 + 0.4 + 0.8 s between 5 attempts, 1.5 s of sleep in all; then `StoreUnavailable`."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except sa.exc.DBAPIError as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise StoreUnavailable("the database is not answering; try again shortly") from None
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


_writer_locks: weakref.WeakKeyDictionary[Engine, threading.RLock] = weakref.WeakKeyDictionary()
_writer_locks_guard = threading.Lock()


def _writer_lock(engine: Engine) -> threading.RLock:
    with _writer_locks_guard:
        lock = _writer_locks.get(engine)
        if lock is None:
            lock = _writer_locks[engine] = threading.RLock()
        return lock


@contextmanager
def write_txn(engine: Engine) -> Iterator[Connection]:
    """A write transaction: BEGIN IMMEDIATE on SQLite, a plain transaction on PostgreSQL.

    On SQLite the threads of this process also queue on a lock first: a writer that finds the
    database locked sleeps in SQLite's busy handler (1, 2, 5 … 100 ms) and wakes up late, so under
    load the write lock would sit idle between transactions. Other processes still wait on
    `busy_timeout`; a thread that waits as long here fails as SQLite would, "database is locked"."""
    if engine.dialect.name != "sqlite":
        with engine.connect() as conn, conn.begin():
            yield conn
        return
    lock = _writer_lock(engine)
    if not lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_SECONDS):
        raise sa.exc.OperationalError("BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked"))
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield conn
    finally:
        lock.release()


@contextmanager
def read_txn(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn
