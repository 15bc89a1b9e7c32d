"""The registry of runner instances (id, host, pid, version, started_at, heartbeat_at), and the
record of which instance scheduled last (the `scheduler` row of `runner_locks`)."""

from __future__ import annotations

import contextlib
import os
import socket
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from codex_runner import __version__
from codex_runner.errors import InstanceConflict
from codex_runner.store.engine import read_txn, with_retries, write_txn
from codex_runner.store.records import iso, utcnow
from codex_runner.store.schema import clock_cutoff, clock_now, instances, locks

#: The `runner_locks` row naming the instance whose claim transaction last took the scheduler lock
#: and claimed work. The lock itself is PostgreSQL's advisory lock (SQLite: BEGIN IMMEDIATE); this
#: row only tells an operator who holds the scheduling role (docs/crash-safety.md).
SCHEDULER_LOCK = "scheduler"
#: PostgreSQL: the class (first key) of the advisory lock on one RUNNER_ID, taken by `register`;
#: the two-key lock space is apart from the one-key locks of claims, creates and migrations.
REGISTER_LOCK_CLASS = 0x636F6465


class InstanceRegistry:
    def __init__(self, engine: Engine, runner_id: str) -> None:
        self.engine = engine
        self.runner_id = runner_id
        self.is_pg = engine.dialect.name == "postgresql"

    def check_free(self, stale_after_seconds: int) -> None:
        """Raises `InstanceConflict` when another live instance holds this RUNNER_ID (see
        `_holder`). Called before start-up, so the refusal is one line and nothing has started."""
        with read_txn(self.engine) as conn:
            problem = self._holder(conn, stale_after_seconds)
        if problem:
            raise InstanceConflict(problem)

    def _holder(self, conn: sa.Connection, stale_after_seconds: int) -> str | None:
        """Who else runs under this id, if anyone: a row that has not stopped and heartbeated within
        RUNNER_STALE_AFTER_SECONDS, of another host, or of a live codex-runner process of this host
        that is not this one. A crashed process (gone, or its pid reused by another program) is
        not a holder: that is the restart that start-up recovery is for."""
        cutoff = clock_cutoff(self.is_pg, stale_after_seconds)
        row = conn.execute(
            sa.select(instances.c.host, instances.c.pid).where(
                instances.c.id == self.runner_id,
                instances.c.stopped_at.is_(None),
                instances.c.heartbeat_at >= cutoff,
            )
        ).first()
        if row is None:
            return None
        if row.host == socket.gethostname() and (row.pid == os.getpid() or not _is_runner_process(row.pid)):
            return None
        return (
            f"RUNNER_ID {self.runner_id!r} is in use by pid {row.pid} on {row.host}, which heartbeated within "
            f"the last {stale_after_seconds} s; give each instance its own RUNNER_ID, or wait until that "
            "one has been stopped or silent for RUNNER_STALE_AFTER_SECONDS"
        )

    def register(self, stale_after_seconds: int | None = None) -> None:
        """Records this instance as live. With `stale_after_seconds`, refuses (InstanceConflict)
        when another live instance holds the id, checked in the same transaction."""
        now = utcnow()
        values = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": __version__,
            "started_at": now,
            "heartbeat_at": clock_now(self.is_pg),
            "stopped_at": None,
        }

        def txn() -> None:
            with write_txn(self.engine, op="instances.register") as conn:
                if self.engine.dialect.name == "postgresql":
                    # Instances of one id that start together register one after the other, so the
                    # later one's check sees the earlier one's row (READ COMMITTED takes no lock
                    # for a plain read; SQLite's BEGIN IMMEDIATE serialises already).
                    conn.execute(
                        sa.select(
                            sa.func.pg_advisory_xact_lock(
                                REGISTER_LOCK_CLASS, sa.func.hashtext(self.runner_id)
                            )
                        )
                    )
                problem = self._holder(conn, stale_after_seconds) if stale_after_seconds else None
                if problem:
                    raise InstanceConflict(problem)
                updated = conn.execute(
                    instances.update().where(instances.c.id == self.runner_id).values(**values)
                ).rowcount
                if not updated:
                    conn.execute(instances.insert().values(id=self.runner_id, **values))

        with_retries(txn)

    def _mine(self) -> tuple[sa.ColumnElement[bool], ...]:
        # The row as this process registered it: another process that took the id over since (this
        # one was frozen past RUNNER_STALE_AFTER_SECONDS, and a replacement started) re-registered
        # it with its own host and pid.
        return (
            instances.c.id == self.runner_id,
            instances.c.host == socket.gethostname(),
            instances.c.pid == os.getpid(),
        )

    def heartbeat(self) -> bool:
        """Refreshes this instance's row; False when the row is no longer this process's (the id
        was taken over): the caller must stop running under it."""

        def txn() -> bool:
            with write_txn(self.engine, op="instances.heartbeat", idempotent=True) as conn:
                return bool(
                    conn.execute(
                        instances.update().where(*self._mine()).values(heartbeat_at=clock_now(self.is_pg))
                    ).rowcount
                )

        return with_retries(txn)

    def stopped(self) -> None:
        """Marks this instance stopped, unless another process holds the id now."""

        def txn() -> None:
            with write_txn(self.engine, op="instances.stopped", idempotent=True) as conn:
                conn.execute(instances.update().where(*self._mine()).values(stopped_at=utcnow()))

        with_retries(txn)

    def forget(self) -> None:
        """Deletes this instance's row (an API-only `serve` leaving: its id names one process)."""

        def txn() -> None:
            with write_txn(self.engine, op="instances.forget", idempotent=True) as conn:
                conn.execute(instances.delete().where(instances.c.id == self.runner_id))

        with_retries(txn)

    def live_instances(self, stale_after_seconds: int) -> list[str]:
        """Instances that heartbeated recently and have not stopped."""
        cutoff = clock_cutoff(self.is_pg, stale_after_seconds)
        with read_txn(self.engine) as conn:
            rows = conn.execute(
                sa.select(instances.c.id).where(
                    instances.c.stopped_at.is_(None), instances.c.heartbeat_at >= cutoff
                )
            ).scalars()
            return list(rows)

    def record_scheduler(self, poll_seconds: float) -> None:
        """Notes that this instance's claim just took the scheduler lock and claimed work; the role
        counts as held until its next poll (`expires_at`)."""
        until = utcnow() + timedelta(seconds=poll_seconds)

        def txn() -> None:
            with write_txn(self.engine, op="instances.record_scheduler") as conn:
                updated = conn.execute(
                    locks.update()
                    .where(locks.c.name == SCHEDULER_LOCK)
                    .values(holder=self.runner_id, expires_at=until)
                ).rowcount
                if not updated:
                    conn.execute(
                        locks.insert().values(name=SCHEDULER_LOCK, holder=self.runner_id, expires_at=until)
                    )

        # IntegrityError: another instance inserted the row first; its claim is as recent as ours.
        with contextlib.suppress(sa.exc.IntegrityError):
            with_retries(txn)

    @staticmethod
    def scheduler_lock(engine: Engine) -> dict[str, Any] | None:
        """For diagnostics: who scheduled last, until when, and whether that is still current."""

        def txn() -> dict[str, Any] | None:
            with read_txn(engine) as conn:
                row = conn.execute(sa.select(locks).where(locks.c.name == SCHEDULER_LOCK)).first()
            if row is None:
                return None
            expires: datetime = row.expires_at
            return {"holder": row.holder, "until": iso(expires), "current": expires > utcnow()}

        return with_retries(txn)


def _is_runner_process(pid: int) -> bool:
    """Whether `pid` is a live codex-runner process of this host (its command line says so)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"codex-runner" in cmdline or b"codex_runner" in cmdline
