"""The watchdog meets a row lock held by an owner frozen in the middle of a write (SIGSTOP, a
paused VM): PostgreSQL only, where such a lock is held until the owner wakes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import sqlalchemy as sa

from codex_runner.launcher import Launcher
from codex_runner.runtime import Runtime
from codex_runner.store.schema import jobs

from tests.integration.conftest import runner_settings
from tests.integration.test_launcher import _create_scratch_job, _make_stale


def test_a_stale_job_whose_row_is_locked_is_skipped_not_waited_for(
    pg_database_url: str, tmp_path: Path
) -> None:
    """A watchdog pass fails the other stale jobs at once and leaves the locked one `running` (its
    write would wait as long as the owner stays frozen, and every other dead instance's jobs with
    it); the next pass, once the lock is gone, fails it."""
    rt = Runtime.open(runner_settings(tmp_path, pg_database_url, RUNNER_STALE_AFTER_SECONDS="5"))
    try:
        frozen, dead = _create_scratch_job(rt), _create_scratch_job(rt)
        rt.jobs.claim("owner-vm-1", slots=2, max_jobs_per_user=5)
        _make_stale(rt, frozen["id"])
        _make_stale(rt, dead["id"])
        launcher = Launcher(rt)
        launcher._db_ok_since -= 1000  # the database has answered for long: no grace for owners

        holder = rt.engine.connect()
        try:
            txn = holder.begin()
            holder.execute(sa.select(jobs.c.id).where(jobs.c.id == frozen["id"]).with_for_update())
            started = time.monotonic()
            assert asyncio.run(asyncio.wait_for(launcher.watchdog_once(), 30)) == 1
            assert time.monotonic() - started < 10
            assert (rt.jobs.get_row(frozen["id"]) or {})["status"] == "running"
            row = rt.jobs.get_row(dead["id"]) or {}
            assert (row["status"], row["error_code"]) == ("failed", "heartbeat_stale")
            txn.rollback()
        finally:
            holder.close()

        assert asyncio.run(launcher.watchdog_once()) == 1
        row = rt.jobs.get_row(frozen["id"]) or {}
        assert (row["status"], row["error_code"]) == ("failed", "heartbeat_stale")
    finally:
        rt.close()
