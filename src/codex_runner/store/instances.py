"""The registry of runner instances (id, host, pid, version, started_at, heartbeat_at)."""

from __future__ import annotations

import os
import socket

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from codex_runner import __version__
from codex_runner.store.engine import with_retries, write_txn
from codex_runner.store.records import utcnow
from codex_runner.store.schema import instances


class InstanceRegistry:
    def __init__(self, engine: Engine, runner_id: str) -> None:
        self.engine = engine
        self.runner_id = runner_id

    def register(self) -> None:
        now = utcnow()
        values = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": __version__,
            "started_at": now,
            "heartbeat_at": now,
            "stopped_at": None,
        }

        def txn() -> None:
            with write_txn(self.engine) as conn:
                updated = conn.execute(
                    instances.update().where(instances.c.id == self.runner_id).values(**values)
                ).rowcount
                if not updated:
                    conn.execute(instances.insert().values(id=self.runner_id, **values))

        with_retries(txn)

    def heartbeat(self) -> None:
        def txn() -> None:
            with write_txn(self.engine) as conn:
                conn.execute(
                    instances.update().where(instances.c.id == self.runner_id).values(heartbeat_at=utcnow())
                )

        with_retries(txn)

    def stopped(self) -> None:
        def txn() -> None:
            with write_txn(self.engine) as conn:
                conn.execute(
                    instances.update().where(instances.c.id == self.runner_id).values(stopped_at=utcnow())
                )

        with_retries(txn)

    def live_instances(self, stale_after_seconds: int) -> list[str]:
        """Instances that heartbeated recently and have not stopped."""
        from datetime import timedelta

        cutoff = utcnow() - timedelta(seconds=stale_after_seconds)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(instances.c.id).where(
                    instances.c.stopped_at.is_(None), instances.c.heartbeat_at >= cutoff
                )
            ).scalars()
            return list(rows)
