"""Schema migrations with alembic, run by `codex-runner migrate` and at start-up."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from codex_runner import __version__
from codex_runner.errors import ConfigError
from codex_runner.store.engine import without_answer_deadline

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
MIGRATE_LOCK_KEY = 0x636F646578_00


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_known(revision: str | None) -> bool:
    """Whether this build has the migration `revision` (None, an empty database, counts as known).
    An unknown one was written by a newer codex-runner: this one cannot upgrade from it."""
    if revision is None:
        return True
    script = ScriptDirectory.from_config(_config())
    return revision in {r.revision for r in script.walk_revisions()}


def newer_schema_message(current: str | None) -> str:
    """What to say about a database migrated by a newer codex-runner (revision `current`)."""
    return (
        f"database schema is at revision {current}, newer than this version of codex-runner "
        f"({__version__}, whose newest revision is {head_revision()}): it was migrated by a newer "
        "codex-runner; run that version, or restore a backup made before the upgrade"
    )


def check_not_newer(revision: str | None) -> None:
    """Raises `ConfigError` when `revision` was written by a newer codex-runner."""
    if not is_known(revision):
        raise ConfigError(newer_schema_message(revision))


def upgrade(engine: Engine) -> None:
    """Brings the schema to head. Several instances may start at once: on PostgreSQL they queue
    on an advisory lock; on SQLite on the write lock, taken up front (BEGIN IMMEDIATE) for the
    whole upgrade. Alembic reads the version and then writes: in a deferred transaction the later
    writer fails at once with "database is locked" (SQLite does not wait for a lock that a reader
    upgrading to writer would deadlock on), and with a transaction per migration (alembic's
    default on SQLite) another instance could run a migration in between."""
    cfg = _config()
    # No time limit on an answer: the lock waits for another instance's whole upgrade, and a
    # migration may rewrite a big table.
    with engine.connect() as conn, without_answer_deadline(conn):
        if engine.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_lock(MIGRATE_LOCK_KEY)))
            conn.commit()
        elif engine.dialect.name == "sqlite":
            # Begun here, the transaction is alembic's "external" one: it neither begins nor
            # commits its own, so the upgrade is one transaction under the write lock.
            conn.execution_options(sqlite_begin="IMMEDIATE").begin()
        try:
            # alembic would fail with "Can't locate revision": say that the schema is newer.
            check_not_newer(MigrationContext.configure(conn).get_current_revision())
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()
        finally:
            if engine.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_unlock(MIGRATE_LOCK_KEY)))
                conn.commit()


def is_current(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()
