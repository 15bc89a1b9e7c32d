"""Engines for SQLite (WAL, busy timeout, foreign keys) and PostgreSQL (psycopg 3), and the retry
policy for transient database errors."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from codex_runner.errors import CommitOutcomeUnknown, StoreFull, StoreUnavailable
from codex_runner.store import fullness

T = TypeVar("T")
log = structlog.get_logger("codex_runner.store")

# SPEC issue 6: 5 attempts from 100 ms, under 3 s in all.
RETRY_ATTEMPTS = 5
RETRY_FIRST_DELAY = 0.1
# How long an SQLite writer waits for the write lock before "database is locked".
SQLITE_BUSY_TIMEOUT_SECONDS = 30
# `PRAGMA journal_mode=WAL` on a fresh file can answer SQLITE_BUSY at once, without the busy
# handler, while another process switches the mode: tried again this often, this far apart.
WAL_PRAGMA_ATTEMPTS = 50
#: sqlite3 names the extended codes from Python 3.12 on: SQLITE_IOERR | (19 << 8).
SQLITE_IOERR_SHMSIZE = 4874
DISK_FULL_MESSAGE = "the database's disk is full; try again later"
WAL_PRAGMA_DELAY = 0.05
#: What `pg_stat_activity` shows for the runner's connections, with the RUNNER_ID of a service.
APPLICATION_NAME = "codex-runner"
# Every PostgreSQL session: a session idle inside a transaction (a frozen instance) lets its locks
# go after 30 s; and TimeZone UTC, because timestamps are stored naive UTC (`UTCDateTime`) and
# an aware bind against them is compared through the session's TimeZone.
PG_SESSION_OPTIONS = ("-c idle_in_transaction_session_timeout=30000", "-c timezone=UTC")
# libpq TCP settings of every PostgreSQL connection: a server host that went away (powered off,
# cut off by the network) is noticed within about 30 s, by keepalives on an idle connection and
# by unacknowledged data on a busy one, instead of the kernel's defaults (two hours; about 15
# minutes of retransmissions). A server that is frozen but whose kernel still answers TCP is not
# noticed this way: see `DatabaseProbe` and docs/failure-modes.md.
PG_TCP_ARGS = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
# How long any one exchange with PostgreSQL (a statement, a COMMIT) may go without an answer
# before the connection is closed and the call fails (`DeadlineConnection`): the case the TCP
# settings above do not catch, a server or proxy that keeps the connection open and never answers.
# Above the longest wait a healthy server makes a statement do here: a lock held by a frozen
# instance, which `idle_in_transaction_session_timeout` (30 s) releases.
PG_ANSWER_TIMEOUT_SECONDS = 45.0
# SQLSTATEs that end the session: class 08 (connection exceptions), 57P01-57P03 (shut down).
_DISCONNECT_STATES = frozenset({"57P01", "57P02", "57P03"})


def normalise_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here; SQLAlchemy would otherwise pick psycopg2."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("postgres://"):
        return "postgresql+psycopg://" + url[len("postgres://") :]
    return url


@contextmanager
def without_answer_deadline(conn: Connection) -> Iterator[Connection]:
    """No time limit on `conn`'s statements for the block: for migrations, whose lock waits for
    another instance's whole upgrade and whose statements may rewrite big tables."""
    dbapi: Any = conn.connection.dbapi_connection
    if conn.dialect.name != "postgresql" or not hasattr(dbapi, "answer_timeout"):
        yield conn
        return
    before, dbapi.answer_timeout = dbapi.answer_timeout, None
    try:
        yield conn
    finally:
        dbapi.answer_timeout = before


def create_store_engine(
    url: str,
    *,
    pool_size: int = 10,
    answer_timeout: float = PG_ANSWER_TIMEOUT_SECONDS,
    application_name: str = APPLICATION_NAME,
) -> Engine:
    """`answer_timeout`: PostgreSQL only, how long one exchange with the server may take
    (`pg_conn.DeadlineConnection`). `application_name`: PostgreSQL only, what `pg_stat_activity`
    shows for these connections (a service passes its RUNNER_ID)."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        db_path = sa.engine.make_url(url).database
        if db_path and db_path != ":memory:":
            # Private, as the data folder it usually is: it holds every job's arguments.
            Path(db_path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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
            # The busy timeout first: every later pragma may have to wait for another process.
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
            try:
                _set_wal(cur)
            except sqlite3.OperationalError as exc:
                # The first connection makes the -wal and -shm files: on a full disk every command
                # and every start would fail with "disk I/O error". Not a driver error, so the
                # pool passes it on as it is (and `with_retries` does not wait for it).
                if _sqlite_full(exc):
                    fullness.refused(engine)
                    raise StoreFull(DISK_FULL_MESSAGE) from None
                raise
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
    engine = sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args=pg_connect_args(url, connect_timeout=5, application_name=application_name),
    )

    from codex_runner.store.pg_conn import DeadlineConnection  # psycopg: 80 ms to import

    @event.listens_for(engine, "do_connect")
    def _pg_connect(_dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> DeadlineConnection:
        conn = DeadlineConnection.connect(*cargs, **cparams)
        conn.answer_timeout = answer_timeout
        return conn

    return engine


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class DatabaseProbe:
    """Whether the database answers `SELECT 1` within `timeout` seconds, for `/readyz`: on a new
    connection each time (a pooled one would first be pinged, and hang, on a server that stopped
    answering), in a thread of its own with at most one check in flight. A check stuck on a server
    that accepts connections but never answers them ties up that one thread, not one per probe,
    and every probe meanwhile answers "not ready" at once."""

    def __init__(self, url: str, *, timeout: float = 3.0) -> None:
        self.timeout = timeout
        url = normalise_url(url)  # psycopg 3, as the store's engine: SQLAlchemy 2.0 would pick psycopg2
        if url.startswith("sqlite"):
            self._engine = create_store_engine(url, pool_size=1)
        else:
            self._engine = sa.create_engine(
                url,
                poolclass=sa.pool.NullPool,
                # libpq's least connect timeout; under `timeout`, so it decides first.
                connect_args=pg_connect_args(url, connect_timeout=2),
            )
        self._in_flight = threading.Lock()
        self._thread_pool = ThreadPoolExecutor(1, thread_name_prefix="db-probe")

    def _check(self) -> None:
        try:
            with self._engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        finally:
            self._in_flight.release()

    async def answers(self) -> bool:
        if not self._in_flight.acquire(blocking=False):
            return False  # the last check is still waiting for the server
        try:
            future = asyncio.get_running_loop().run_in_executor(self._thread_pool, self._check)
        except BaseException:
            self._in_flight.release()
            raise
        future.add_done_callback(_retrieve)  # its error is the answer, not something to log
        try:
            await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except Exception:
            return False  # a timeout (the check goes on, in flight) or a database error
        return True

    def close(self) -> None:
        self._thread_pool.shutdown(wait=False, cancel_futures=True)
        self._engine.dispose()


def pg_connect_args(
    url: str, *, connect_timeout: int, application_name: str = APPLICATION_NAME
) -> dict[str, Any]:
    """psycopg's connection arguments for every PostgreSQL connection of the runner. Its
    `application_name` tells an operator in `pg_stat_activity` which instance holds which
    connection, unless the URL names one itself (`?application_name=`), which then wins."""
    args = {"connect_timeout": connect_timeout, "options": pg_session_options(url), **PG_TCP_ARGS}
    if "application_name" not in sa.engine.make_url(url).query:
        # The server keeps 63 bytes of it and shows non-ASCII characters as `?`.
        args["application_name"] = application_name
    return args


def pg_session_options(url: str) -> str:
    """libpq `options` for every session: ours, with those of the URL (`?options=...`, which
    `connect_args` would otherwise replace) in between, so that TimeZone=UTC always comes last."""
    given = sa.engine.make_url(url).query.get("options")
    extra = [given] if isinstance(given, str) else list(given or ())
    return " ".join([PG_SESSION_OPTIONS[0], *extra, *PG_SESSION_OPTIONS[1:]])


def _set_wal(cur: sqlite3.Cursor) -> None:
    for attempt in range(1, WAL_PRAGMA_ATTEMPTS + 1):
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            if attempt == WAL_PRAGMA_ATTEMPTS or not ("locked" in text or "busy" in text):
                raise
            time.sleep(WAL_PRAGMA_DELAY)


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: SQLite busy/locked, a full disk (SQLite's; PostgreSQL's `disk_full`
    is an OperationalError like the rest), PostgreSQL serialization/deadlock failures and dropped
    or refused connections."""
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
        if isinstance(orig, sqlite3.OperationalError):
            text = str(orig).lower()
            return "locked" in text or "busy" in text or _disk_full(exc)
        sqlstate = getattr(orig, "sqlstate", None)
        if sqlstate in {"40001", "40P01", "57P01", "57P02", "57P03", "08000", "08003", "08006", "08001"}:
            return True
        if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
            return True
    return False


def _disk_full(exc: sa.exc.DBAPIError) -> bool:
    """SQLITE_FULL ("database or disk is full"), or PostgreSQL's `disk_full` (53100). Space may come
    back any moment (a job's file removed, retention), so it is an outage like any other: retried
    here, and the launcher's own writes wait for it (a job's status is not lost to it)."""
    orig = exc.orig
    if isinstance(orig, sqlite3.Error):
        return _sqlite_full(orig)
    return getattr(orig, "sqlstate", None) == "53100"


def _sqlite_full(exc: sqlite3.Error) -> bool:
    """SQLITE_FULL, or SQLITE_IOERR_SHMSIZE: the `-shm` file could not be given its size, which on
    a full disk is what every statement of a new connection answers ("disk I/O error")."""
    code = getattr(exc, "sqlite_errorcode", 0)
    return (code & 0xFF) == sqlite3.SQLITE_FULL or code == SQLITE_IOERR_SHMSIZE


def _silent(exc: sa.exc.DBAPIError) -> bool:
    """The server took a connection, or a statement, and never answered (`NoAnswer`, libpq's
    connect timeout): another attempt would wait as long again, so the caller hears at once."""
    if "psycopg" not in sys.modules:
        return False  # SQLite only: not imported for nothing
    from psycopg.errors import ConnectionTimeout

    from codex_runner.store.pg_conn import NoAnswer

    return isinstance(exc.orig, NoAnswer | ConnectionTimeout)


def commit_outcome_unknown(exc: sa.exc.DBAPIError) -> bool:
    """Whether a COMMIT that raised `exc` may have been applied all the same: the connection went
    away (PostgreSQL), so the server may have committed before the answer was lost. An SQLite
    COMMIT that fails (busy) leaves the transaction open, not committed: known, and retryable."""
    if isinstance(exc.orig, sqlite3.Error):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate is None:  # the driver's own error: no answer from the server
        return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError)
    return sqlstate.startswith("08") or sqlstate in _DISCONNECT_STATES


def with_retries(
    fn: Callable[[], T], *, attempts: int = RETRY_ATTEMPTS, first_delay: float = RETRY_FIRST_DELAY
) -> T:
    """Runs `fn` (one whole transaction) again on transient errors with exponential backoff:
    0.1 + 0.2 + 0.4 + 0.8 s between 5 attempts, 1.5 s of sleep in all; then `StoreUnavailable`.
    A write whose COMMIT may have been applied is not run again: `write_txn` raises
    `CommitOutcomeUnknown` for it, which passes through here."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except sa.exc.DBAPIError as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts or _silent(exc):
                if _disk_full(exc):
                    raise StoreFull(DISK_FULL_MESSAGE) from None
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
def write_txn(engine: Engine, *, op: str, idempotent: bool = False) -> Iterator[Connection]:
    """A write transaction: BEGIN IMMEDIATE on SQLite, a plain transaction on PostgreSQL.

    `op` names the write (`jobs.claim`: the store and method, a literal at each call site): the
    one thing a `commit_outcome_unknown` warning says about it, never the values it wrote.

    On SQLite the threads of this process also queue on a lock first: a writer that finds the
    database locked sleeps in SQLite's busy handler (1, 2, 5 … 100 ms) and wakes up late, so under
    load the write lock would sit idle between transactions. Other processes still wait on
    `busy_timeout`; a thread that waits as long here fails as SQLite would, "database is locked".

    A COMMIT that loses its connection raises `CommitOutcomeUnknown` (see
    `commit_outcome_unknown`): running the transaction again could apply it twice. With
    `idempotent` (a heartbeat, a fenced field update: applied twice, the same as once), it raises
    the connection error itself, which `with_retries` tries again like any other."""
    # While the disk is full (`fullness`): whether this transaction writes, to end that state.
    watch = fullness.disk_full(engine)
    if engine.dialect.name != "sqlite":
        committing = wrote = False
        try:
            with engine.connect() as conn, conn.begin():
                yield conn
                wrote = watch and _pg_wrote(conn)
                committing = True  # the body is done: what fails from here on is the COMMIT
        except sa.exc.DBAPIError as exc:
            if _disk_full(exc):
                fullness.refused(engine)
            if committing and not idempotent and commit_outcome_unknown(exc):
                log.warning("commit_outcome_unknown", op=op, error_type=type(exc.orig).__name__)
                raise CommitOutcomeUnknown(
                    "the database connection was lost during COMMIT; the write may or may not have been applied"
                ) from exc
            raise
        if wrote:
            fullness.landed(engine)
        return
    lock = _writer_lock(engine)
    if not lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_SECONDS):
        raise sa.exc.OperationalError("BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked"))
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            before = _sqlite_changes(conn) if watch else 0
            with conn.begin():
                yield conn
            if watch and _sqlite_changes(conn) > before:
                fullness.landed(engine)
    except sa.exc.DBAPIError as exc:
        if _disk_full(exc):
            fullness.refused(engine)
        raise
    finally:
        lock.release()


def _sqlite_changes(conn: Connection) -> int:
    """Rows this SQLite connection has changed since it opened (a counter, no statement)."""
    dbapi: Any = conn.connection.dbapi_connection
    return int(dbapi.total_changes)


def _pg_wrote(conn: Connection) -> bool:
    """Whether the open PostgreSQL transaction has written anything: only a writer gets a
    transaction id."""
    return conn.exec_driver_sql("SELECT txid_current_if_assigned()").scalar() is not None


@contextmanager
def read_txn(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn
