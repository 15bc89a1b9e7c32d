"""Start-up recovery (`Launcher.recover_own_jobs`) of what an earlier life of this RUNNER_ID left:
its recorded process groups, processes found by `RUNNER_JOB_ID` of jobs no longer active, and the
run folder of a job another instance's watchdog failed while this one was down."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from codex_runner.execution.manifest import MANIFEST_NAME
from codex_runner.execution.process import process_start_time
from codex_runner.jobs import ErrorCode, EventType
from codex_runner.launcher import Launcher
from codex_runner.store.schema import jobs

from tests.helpers import process_alive, wait_until
from tests.integration.test_launcher import (
    _create_scratch_job,
    _head_and_status,
    _in_place_job_left_on_its_branch,
    _make_stale,
)

SLEEPER = [sys.executable, "-c", "import time; time.sleep(300)"]


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; none outlives it, whatever the recovery did to them."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _sleeper(
    spawned: list[subprocess.Popen[bytes]], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A process in a session (and group) of its own, as a job's script runs."""
    proc = subprocess.Popen(SLEEPER, start_new_session=True, env={**os.environ, **(env or {})})
    spawned.append(proc)
    # Its start time is that of the exec'd interpreter's process, readable once it runs.
    assert wait_until(lambda: process_start_time(proc.pid) is not None, timeout=5)
    return proc


def _record_process(rt: Any, job_id: str, pid: int, start_time: int) -> None:
    """What the crashed run had written to the row once its script started."""
    with rt.engine.begin() as conn:
        conn.execute(
            jobs.update().where(jobs.c.id == job_id).values(pid=pid, pgid=pid, proc_start_time=start_time)
        )


def _gone(proc: subprocess.Popen[bytes]) -> bool:
    """Reaped here (its parent), so a kill shows as an exit, not as a zombie that looks alive."""
    return proc.poll() is not None or not process_alive(proc.pid)


def test_start_up_kills_the_recorded_group_of_a_crashed_run_and_not_a_recycled_pid(
    runner_factory: Any, spawned: list[subprocess.Popen[bytes]]
) -> None:
    """The row's pid, pgid and start time are how start-up finds a crashed run's script when its
    environment cannot tell (a script that cleared `RUNNER_JOB_ID`): its group is killed before
    the job is failed. A pid recorded with another start time is a recycled one: that process is
    someone else's and is left alone."""
    runner = runner_factory(RUNNER_ENABLED="false")
    rt = runner.runtime
    ours = _create_scratch_job(rt)
    recycled = _create_scratch_job(rt)
    rt.jobs.claim(rt.settings.id, slots=2, max_jobs_per_user=5)
    script = _sleeper(spawned)
    stranger = _sleeper(spawned)
    _record_process(rt, ours["id"], script.pid, process_start_time(script.pid) or 0)
    _record_process(rt, recycled["id"], stranger.pid, (process_start_time(stranger.pid) or 0) - 1)

    assert asyncio.run(Launcher(rt).recover_own_jobs()) == 2
    assert wait_until(lambda: _gone(script), timeout=10)
    assert not _gone(stranger)
    for job in (ours, recycled):
        row = rt.jobs.get_row(job["id"])
        assert row is not None and (row["status"], row["error_code"]) == ("failed", "recovered_after_crash")


def test_start_up_kills_processes_of_its_jobs_failed_elsewhere_and_no_other_instances(
    runner_factory: Any, spawned: list[subprocess.Popen[bytes]]
) -> None:
    """A job of this RUNNER_ID that another instance's watchdog failed while this one was down is
    no longer active, but its script may still run here (a frozen VM that woke): found by its
    `RUNNER_JOB_ID`, it is killed. A job another instance runs on this host is not ours."""
    runner = runner_factory(RUNNER_ENABLED="false", RUNNER_STALE_AFTER_SECONDS="600")
    rt = runner.runtime
    failed_elsewhere = _create_scratch_job(rt)
    rt.jobs.claim(rt.settings.id, slots=1, max_jobs_per_user=5)
    others = _create_scratch_job(rt)
    rt.jobs.claim("other-instance", slots=1, max_jobs_per_user=5)
    _make_stale(rt, failed_elsewhere["id"])
    assert rt.jobs.fail_stale(
        failed_elsewhere["id"],
        600,
        event_type=EventType.HEARTBEAT_STALE_RECOVERED,
        message="no heartbeat",
        meta={"recovered_by": "other-instance"},
        values={"error_code": ErrorCode.HEARTBEAT_STALE, "lease_token": None},
    )
    left = _sleeper(spawned, {"RUNNER_JOB_ID": failed_elsewhere["id"]})
    not_ours = _sleeper(spawned, {"RUNNER_JOB_ID": others["id"]})

    assert asyncio.run(Launcher(rt).recover_own_jobs()) == 0
    assert wait_until(lambda: _gone(left), timeout=10)
    assert not _gone(not_ours)
    row = rt.jobs.get_row(others["id"])
    assert row is not None and row["status"] == "running"


def test_start_up_cleans_up_the_run_folder_of_a_job_failed_elsewhere(runner_factory: Any) -> None:
    """Another instance's watchdog failed a job of this RUNNER_ID while it was down, but could not
    see its run folder or its workspace (another host): its manifest said `running` for ever and
    its in_place repo stayed on the job's branch, refusing every later job. Start-up does both."""
    runner = runner_factory(RUNNER_ENABLED="false", RUNNER_STALE_AFTER_SECONDS="600")
    rt, job_id, source = _in_place_job_left_on_its_branch(runner, record=True)
    _make_stale(rt, job_id)
    assert rt.jobs.fail_stale(
        job_id,
        600,
        event_type=EventType.HEARTBEAT_STALE_RECOVERED,
        message="no heartbeat",
        meta={"recovered_by": "other-host"},
        values={"error_code": ErrorCode.HEARTBEAT_STALE, "lease_token": None},
    )
    assert _head_and_status(source)[0].startswith("refs/heads/runner/")

    assert asyncio.run(Launcher(rt).recover_own_jobs()) == 0
    assert _head_and_status(source) == ("refs/heads/main", "", "")
    manifest = json.loads((rt.settings.runs_dir / job_id / MANIFEST_NAME).read_text())
    assert (manifest["status"], manifest["error_code"]) == ("failed", "heartbeat_stale")
    row = rt.jobs.get_row(job_id)
    assert row is not None and (row["status"], row["error_code"]) == ("failed", "heartbeat_stale")


def test_start_up_recovery_deletes_nothing_outside_the_workspace_dir(runner_factory: Any) -> None:
    """Recovery deletes the workspace its run manifest names. A record naming a folder outside
    RUNNER_WORKSPACE_DIR (the setting changed since the crash, a manifest from elsewhere) is not
    a workspace of this runner's: the folder and its files stay, and the job is failed all the
    same."""
    from codex_runner.execution.manifest import ManifestWriter

    runner = runner_factory(RUNNER_ENABLED="false")
    rt = runner.runtime
    job = _create_scratch_job(rt)
    rt.jobs.claim(rt.settings.id, slots=1, max_jobs_per_user=5)
    precious = rt.settings.data_dir.parent / "precious" / job["id"]
    precious.mkdir(parents=True)
    (precious / "notes.txt").write_text("not the runner's\n")
    record = {"mode": "scratch", "path": str(precious), "job_id": job["id"]}
    ManifestWriter(rt.settings.runs_dir / job["id"]).update(
        {"job_id": job["id"], "status": "running", "workspace": record}, force=True
    )

    assert asyncio.run(Launcher(rt).recover_own_jobs()) == 1
    assert (precious / "notes.txt").read_text() == "not the runner's\n"
    row = rt.jobs.get_row(job["id"])
    assert row is not None and (row["status"], row["error_code"]) == ("failed", "recovered_after_crash")
