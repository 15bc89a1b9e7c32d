"""Shutdown by signal of real `serve` and `worker` processes (SPEC §3): the first SIGTERM stops
claiming, gives jobs RUNNER_KILL_GRACE_SECONDS, then fails the rest with `runner_shutdown`; a second
signal exits at once but still kills every job's processes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.chaos.harness import Cluster, job_pids, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("chaos")]

MODES = ["worker", "serve"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_sigterm_fails_running_jobs_after_the_grace(mode: str, tmp_path: Path) -> None:
    with Cluster(
        tmp_path / "c", f"sqlite:///{tmp_path / 'runner.db'}", env={"RUNNER_KILL_GRACE_SECONDS": "2"}
    ) as c:
        inst = c.start("sig-1", mode, RUNNER_MAX_CONCURRENCY="2")
        ids = c.submit(2, sleep=60.0)
        queued = c.submit(1, sleep=0.1)
        wait_for(lambda: c.running_of("sig-1") == set(ids), 60, "the jobs to run")
        wait_for(lambda: len(job_pids(ids)) == 2, 30, "the scripts to start")
        os.kill(inst.pid, signal.SIGTERM)
        t0 = time.monotonic()
        code = inst.proc.wait(timeout=60)
        took = time.monotonic() - t0
        # A graceful shutdown is a clean exit (uvicorn's re-raised signal no longer kills `serve`
        # with 143, skipping the runtime's close).
        assert code == 0, code
        rows = c.rows(ids)
        assert {r["status"] for r in rows.values()} == {"failed"}, rows
        assert {r["error_code"] for r in rows.values()} == {"runner_shutdown"}
        assert job_pids(ids) == {}
        assert c.rows(queued)[queued[0]]["status"] == "queued", "a job was claimed during shutdown"
        assert took >= 2.0, "jobs did not get their grace"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_second_signal_exits_at_once_and_kills_children(mode: str, tmp_path: Path) -> None:
    with Cluster(
        tmp_path / "c", f"sqlite:///{tmp_path / 'runner.db'}", env={"RUNNER_KILL_GRACE_SECONDS": "30"}
    ) as c:
        inst = c.start("sig-2", mode, RUNNER_MAX_CONCURRENCY="2")
        ids = c.submit(2, sleep=60.0)
        wait_for(lambda: c.running_of("sig-2") == set(ids), 60, "the jobs to run")
        wait_for(lambda: len(job_pids(ids)) == 2, 30, "the scripts to start")
        os.kill(inst.pid, signal.SIGTERM)
        time.sleep(1.0)
        assert inst.proc.poll() is None, "the first signal must wait for the grace (30 s)"
        os.kill(inst.pid, signal.SIGTERM)
        t0 = time.monotonic()
        code = inst.proc.wait(timeout=15)
        took = time.monotonic() - t0
        assert code == 128 + signal.SIGTERM, code
        assert took < 5, f"took {took:.1f} s to exit after the second signal"
        assert job_pids(ids) == {}, "children outlived a forced exit"
        # Left running in the database: the next start of this RUNNER_ID fails them.
        assert {r["status"] for r in c.rows(ids).values()} == {"running"}
        c.start("sig-2", "worker")
        wait_for(lambda: c.all_done(ids), 30, "start-up recovery")
        assert {r["error_code"] for r in c.rows(ids).values()} == {"recovered_after_crash"}
