"""An instance cut off from PostgreSQL (a network partition: its statements get no answer) while
its job commits, whose job another host's watchdog fails meanwhile: once the commit is done it
must not push in the job's name (SPEC §3: an instance that lost its lease writes nothing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from codex_runner.jobs import ErrorCode, EventType

from tests.chaos.harness import FAST_ENV, Cluster, check_invariants, job_pids, wait_for
from tests.helpers import FreezingProxy

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("chaos")]


def _stage(manifest: Path, name: str) -> str | None:
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    return {s["name"]: s["status"] for s in doc.get("stages", [])}.get(name)


@pytest.mark.timeout(180)
def test_a_job_failed_by_a_watchdog_during_its_commit_is_not_pushed(
    pg_database_url: str, tmp_path: Path
) -> None:
    """The instance is frozen in its job's commit stage (so the recovery surely comes before the
    push), its database link is cut, and the job is failed as another host's watchdog would
    (`fail_stale`, with no process of this host to kill). Resumed, the instance finished the commit
    and pushed the branch of a job the row calls failed: its only fenced write came before the
    commit, and the heartbeat that would tell it the lease was gone got no answer."""
    proxy = FreezingProxy()
    try:
        with Cluster(tmp_path / "cluster", pg_database_url) as c:
            origin = c.tmp / "origin.git"
            subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
            subprocess.run(
                ["git", "-C", str(c.tmp / "repo"), "remote", "add", "origin", str(origin)], check=True
            )
            proxied = pg_database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
            a = c.start("part-a", "worker", RUNNER_DATABASE_URL=proxied)
            body = {
                "repo": "pushed",
                "script_key": "behave",
                "args": {"files": 4000, "ledger": str(c.ledger)},
            }
            from codex_runner.store.admin import Principal

            job = c.runtime.create_job(Principal("alice", "user"), body)[0]["id"]
            manifest = c.tmp / "data-part-a" / "runs" / job / "manifest.json"

            def committing() -> bool:
                # In the row: the fenced write that comes before the commit is done.
                stages = c.rows([job])[job]["stages"] or []
                return {s["name"]: s["status"] for s in stages}.get("commit") == "running"

            wait_for(committing, 60, "the commit stage", interval=0.005)
            os.kill(a.pid, signal.SIGSTOP)
            try:
                assert _stage(manifest, "push") == "pending", "stopped too late: the push had begun"
                proxy.frozen = True
                stale = int(FAST_ENV["RUNNER_STALE_AFTER_SECONDS"])
                time.sleep(stale + 1.0)
                assert c.runtime.jobs.fail_stale(
                    job,
                    stale,
                    event_type=EventType.HEARTBEAT_STALE_RECOVERED,
                    message="no heartbeat from part-a",
                    meta={"runner_id": "part-a", "recovered_by": "elsewhere"},
                    values={"error_code": ErrorCode.HEARTBEAT_STALE, "lease_token": None},
                )
            finally:
                os.kill(a.pid, signal.SIGCONT)
            # The commit ends; a push would follow at once, database or not.
            wait_for(lambda: _stage(manifest, "commit") != "running", 60, "the commit to end")
            wait_for(lambda: not job_pids([job]), 30, "the job's git to end")
            time.sleep(2.0)
            proxy.frozen = False
            # The fenced run's last act: its manifest says how the row ended.
            wait_for(lambda: json.loads(manifest.read_text())["status"] == "failed", 60, "the run to end")
            branches = subprocess.run(
                ["git", "-C", str(origin), "branch", "--list", "runner/*"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert branches == "", f"a failed job's branch was pushed: {branches}"
            row = c.rows([job])[job]
            assert (row["status"], row["error_code"]) == ("failed", "heartbeat_stale")
            check_invariants(c)
    finally:
        proxy.close()
