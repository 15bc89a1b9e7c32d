"""The SQLite connection settings every connection of the store gets."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from codex_runner.store.engine import commit_outcome_unknown, create_store_engine, pg_session_options


def test_sqlite_connections_keep_temporary_tables_in_memory(tmp_path: Path) -> None:
    """Sorts and statement journals stay in memory: as files they were created and deleted in
    $TMPDIR several times a second under load, which on a busy ext4 costs more than the query."""
    engine = create_store_engine(f"sqlite:///{tmp_path / 'runner.db'}")
    try:
        with engine.connect() as conn:
            pragmas = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "temp_store", "foreign_keys")
            }
    finally:
        engine.dispose()
    # temp_store 2 = MEMORY; synchronous 1 = NORMAL.
    assert pragmas == {"journal_mode": "wal", "synchronous": 1, "temp_store": 2, "foreign_keys": 1}


def test_pg_sessions_keep_url_options_and_end_in_utc() -> None:
    assert pg_session_options("postgresql://h/db") == (
        "-c idle_in_transaction_session_timeout=30000 -c timezone=UTC"
    )
    # The URL's own options stay (connect_args would replace them); TimeZone=UTC still wins.
    assert pg_session_options("postgresql://h/db?options=-c%20timezone%3DEurope/Berlin") == (
        "-c idle_in_transaction_session_timeout=30000 -c timezone=Europe/Berlin -c timezone=UTC"
    )


@pytest.mark.parametrize(
    ("orig", "unknown"),
    [
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),
        (psycopg.errors.AdminShutdown("terminating connection"), True),
        (psycopg.errors.SerializationFailure("could not serialize"), False),
        (psycopg.errors.UniqueViolation("duplicate key"), False),
        (sqlite3.OperationalError("database is locked"), False),
    ],
)
def test_which_failed_commits_may_have_been_applied(orig: Exception, unknown: bool) -> None:
    """Only a COMMIT that lost its connection may have been applied; SQLite's or a refusal by the
    server is known to have failed, and is retried as before."""
    exc = sa.exc.OperationalError("COMMIT", None, orig)
    assert commit_outcome_unknown(exc) is unknown
