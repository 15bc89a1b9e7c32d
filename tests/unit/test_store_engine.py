"""The SQLite connection settings every connection of the store gets."""

from __future__ import annotations

from pathlib import Path

from codex_runner.store.engine import create_store_engine


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
