"""SIGKILL and SIGSTOP of real runner instances (issue 6, acceptance 1 and 4, and start-up recovery
of processes that no recorded pid leads to)."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from codex_runner.store.schema import jobs

from tests.chaos.harness import (
    TERMINAL,
    Cluster,
    check_invariants,
    job_pids,
    random_sleep,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("chaos")]

ROUNDS = {"sqlite": 10, "postgresql": 10}


@pytest.mark.timeout(300)
def test_sigkill_and_restart_rounds(database_url: str, tmp_path: Path) -> None:
    """Acceptance 1: each round submits jobs, SIGKILLs the instance at a random moment (around a
    claim, while jobs run, right as one finishes) and restarts it with the same RUNNER_ID."""
    backend = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"chaos seed {seed}")
    with Cluster(tmp_path / "cluster", database_url, env={"RUNNER_MAX_CONCURRENCY": "3"}) as c:
        submitted: list[str] = []
        queued_at_a_kill: set[str] = set()
        recovered: set[str] = set()
        moments: list[str] = []
        inst = c.start("chaos-1", "worker")
        for rnd in range(ROUNDS[backend]):
            before = {i for i, r in c.rows().items() if r["status"] in TERMINAL}
            ids = c.submit(rng.randint(3, 6), sleep=random_sleep(0.05, 1.5, rng))
            submitted += ids
            moment = rng.choice(["claim", "running", "finishing"])
            moments.append(moment)
            if moment == "claim":
                time.sleep(rng.uniform(0.0, 0.3))
            elif moment == "running":
                wait_for(lambda: c.running_of("chaos-1"), 30, "a running job")
                time.sleep(rng.uniform(0.0, 0.8))
            else:
                wait_for(
                    lambda before=before: (
                        {i for i, r in c.rows().items() if r["status"] in TERMINAL} - before
                    ),
                    60,
                    "a job to finish",
                    interval=0.01,
                )
            c.sigkill(inst)
            orphaned = c.running_of("chaos-1")
            queued_at_a_kill |= {i for i, r in c.rows().items() if r["status"] == "queued"}
            check_invariants(c)

            inst = c.start("chaos-1", "serve" if rnd % 2 else "worker")
            wait_for(lambda orphaned=orphaned: c.all_done(orphaned), 30, f"round {rnd}: recovery")
            # Start-up recovery killed them before it failed their jobs.
            assert job_pids(orphaned) == {}, f"round {rnd} ({moment}): processes outlived recovery"
            for row in c.rows(orphaned).values():
                assert row["status"] == "failed" and row["error_code"] == "recovered_after_crash", row
            recovered |= orphaned
            check_invariants(c)

        wait_for(lambda: c.all_done(submitted), 120, "every job to finish")
        rows = check_invariants(c)
        assert set(rows) == set(submitted)
        for job_id, row in rows.items():
            if job_id in recovered:
                continue
            # Not running at any kill: it ran once, to the end, whatever happened around it.
            assert row["status"] == "success", (job_id, row["status"], row["error_code"])
        # Queued jobs survived every restart and ran later.
        assert all(rows[j]["attempt"] == 1 for j in queued_at_a_kill)
        assert set(submitted) - recovered <= set(c.ledger_ids())
        print(f"{backend}: {len(submitted)} jobs, {len(recovered)} recovered, moments {moments}")


@pytest.mark.timeout(180)
def test_frozen_instance_is_fenced(pg_database_url: str, tmp_path: Path) -> None:
    """Acceptance 4: an instance frozen past the stale threshold loses its jobs to another
    instance's watchdog, which also kills their processes on its host; once resumed the frozen
    one writes nothing to them."""
    with Cluster(tmp_path / "cluster", pg_database_url) as c:
        # B only watches: its one slot is taken by a blocker, so A's jobs can only run on A.
        c.start("frozen-b", "serve", RUNNER_MAX_CONCURRENCY="1")
        blocker = c.submit(1, sleep=120.0, user="bob")
        wait_for(lambda: c.running_of("frozen-b") == set(blocker), 30, "B to take the blocker")
        a = c.start("frozen-a", "worker", RUNNER_MAX_CONCURRENCY="3")
        short = c.submit(1, sleep=5.0)  # exits while A is frozen: A sees it end only after SIGCONT
        long = c.submit(2, sleep=120.0)
        ids = short + long
        wait_for(lambda: c.running_of("frozen-a") == set(ids), 30, "A to run the jobs")
        wait_for(lambda: len(job_pids(ids)) == 3, 30, "the scripts to start")
        wait_for(lambda: all(r["pid"] for r in c.rows(ids).values()), 30, "A to record the pids")
        # What docs/crash-safety.md recommends: a session left idle inside a transaction (its
        # instance frozen mid-write) is ended by the server, so its row locks do not outlive it.
        with c.runtime.engine.connect() as conn:
            name = conn.execute(sa.text("SELECT current_database()")).scalar_one()
            conn.execute(sa.text(f'ALTER DATABASE "{name}" SET idle_in_transaction_session_timeout = 5000'))
            conn.commit()

        os.kill(a.pid, signal.SIGSTOP)
        try:
            frozen_at = time.monotonic()
            wait_for(lambda: c.all_done(ids), 20, "B's watchdog to recover A's jobs")
            recovered_after = time.monotonic() - frozen_at
            rows = c.rows(ids)
            for row in rows.values():
                assert row["status"] == "failed" and row["error_code"] == "heartbeat_stale", row
                assert row["lease_token"] is None
            evs = {i: c.events()[i] for i in ids}
            for job_events in evs.values():
                last = job_events[-1]
                assert last["event_type"] == "heartbeat_stale_recovered"
                assert last["meta"]["recovered_by"] == "frozen-b"
            # A's children run on this host too: B's watchdog kills them with the jobs it failed
            # (no process of a job outlives its terminal status), though A is frozen.
            wait_for(lambda: not job_pids(ids), 15, "B's watchdog to kill the failed jobs' processes")
        finally:
            os.kill(a.pid, signal.SIGCONT)
        woke = time.monotonic()
        wait_for(lambda: not job_pids(ids), 10, "the fenced jobs' processes to be gone")
        killed_after = time.monotonic() - woke
        time.sleep(2.0)  # A's job tasks end after the kill: give any write they would make time to land
        assert c.rows(ids) == rows, "A wrote to jobs it no longer owns"
        assert {i: c.events()[i] for i in ids} == evs, "A added events to jobs it no longer owns"
        assert a.proc.poll() is None, "A died instead of carrying on"
        # A's fenced runs leave their manifests saying how the rows ended, not `running`.
        for job_id in ids:
            manifest = json.loads((c.tmp / "data-frozen-a" / "runs" / job_id / "manifest.json").read_text())
            assert (manifest["status"], manifest["error_code"]) == ("failed", "heartbeat_stale"), manifest
        # A carries on: it still claims and runs new work.
        more = c.submit(4, sleep=0.1)
        wait_for(lambda: c.all_done(more), 60, "new jobs after the freeze")
        assert {r["status"] for r in c.rows(more).values()} == {"success"}
        check_invariants(c)
        print(
            f"recovered {recovered_after:.2f} s after SIGSTOP; children gone {killed_after:.2f} s after SIGCONT"
        )


@pytest.mark.timeout(180)
def test_restart_kills_leftovers_found_only_by_environment(pg_database_url: str, tmp_path: Path) -> None:
    """Start-up recovery also kills (a) processes of a job whose pid was never recorded; (b) the
    processes of jobs that another instance's watchdog failed while this RUNNER_ID was dead are
    killed by that watchdog when it runs on the same host, and A's restart adds nothing."""
    with Cluster(tmp_path / "cluster", pg_database_url) as c:
        a = c.start("left-a", "worker", RUNNER_MAX_CONCURRENCY="4")
        no_pid = c.submit(2, sleep=120.0)
        wait_for(lambda: c.running_of("left-a") == set(no_pid), 30, "A to run the first jobs")
        wait_for(lambda: len(job_pids(no_pid)) == 2, 30, "the scripts to start")
        c.sigkill(a)
        # As if A had died between spawn and recording the pid.
        with c.runtime.engine.begin() as conn:
            conn.execute(
                sa.update(jobs).where(jobs.c.id.in_(no_pid)).values(pid=None, pgid=None, proc_start_time=None)
            )
        a = c.start("left-a", "worker", RUNNER_MAX_CONCURRENCY="4")
        wait_for(lambda: c.all_done(no_pid), 30, "start-up recovery")
        assert job_pids(no_pid) == {}
        assert {r["error_code"] for r in c.rows(no_pid).values()} == {"recovered_after_crash"}

        watched = c.submit(2, sleep=120.0)
        wait_for(lambda: c.running_of("left-a") == set(watched), 30, "A to run the second jobs")
        wait_for(lambda: len(job_pids(watched)) == 2, 30, "the scripts to start")
        c.sigkill(a)
        c.start("left-b", "worker", RUNNER_MAX_CONCURRENCY="1")
        wait_for(lambda: c.all_done(watched), 20, "B's watchdog")
        # B runs on the same host: the watchdog that failed the jobs kills their orphans too.
        wait_for(lambda: not job_pids(watched), 10, "B's watchdog to kill the orphans on its host")
        evs = {i: c.events()[i] for i in watched}
        c.start("left-a", "worker", RUNNER_MAX_CONCURRENCY="4")
        time.sleep(1.0)  # A's start-up recovery finds nothing more to do, and writes nothing
        assert not job_pids(watched)
        assert {i: c.events()[i] for i in watched} == evs
        check_invariants(c)


def _repo_state(c: Cluster) -> tuple[str, str, str]:
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(c.tmp / "repo"), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    return git("symbolic-ref", "HEAD"), git("status", "--porcelain"), git("branch", "--list", "runner/*")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("restart", ["same_id", "new_id"])
def test_an_in_place_repo_survives_a_crash_early_in_its_job(
    database_url: str, tmp_path: Path, restart: str
) -> None:
    """SIGKILL a fraction of a second into an in_place job's script. The manifest recorded the
    workspace only on the job's next trip (1 s in), so start-up recovery under the same RUNNER_ID
    found nothing to clean up; under a new id (the default at every start) the watchdog failed the
    job and nobody cleaned up at all. Either way the repo stayed on the job's branch with its
    edits, and every later job on it failed `prepare_failed`."""
    with Cluster(tmp_path / "cluster", database_url) as c:
        data = str(c.tmp / "data-shared")  # one data folder on this host, whatever the instance's id
        a = c.start("early-a", "worker", RUNNER_DATA_DIR=data)
        [job] = c.submit(1, sleep=60.0, repo="inplace")
        wait_for(lambda: job in c.ledger_ids(), 30, "the script to start")  # its first act
        (c.tmp / "repo" / "README.md").write_text("half-done by the job\n")
        c.sigkill(a)
        assert _repo_state(c)[0].startswith("refs/heads/runner/")
        c.start("early-a" if restart == "same_id" else "early-b", "worker", RUNNER_DATA_DIR=data)
        wait_for(lambda: c.all_done([job]), 30, "the crashed job to be failed")
        expected = "recovered_after_crash" if restart == "same_id" else "heartbeat_stale"
        assert c.rows([job])[job]["error_code"] == expected
        try:
            wait_for(lambda: _repo_state(c) == ("refs/heads/main", "", ""), 15, "the repo back on main")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {_repo_state(c)}\n{c.tail(c.instances[-1], 60)}") from None
        [after] = c.submit(1, sleep=0.1, repo="inplace")
        wait_for(lambda: c.all_done([after]), 30, "the next in_place job")
        assert c.rows([after])[after]["status"] == "success", c.rows([after])[after]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("restart", ["same_id", "new_id"])
def test_a_recovered_job_stages_and_manifest_say_how_it_ended(
    database_url: str, tmp_path: Path, restart: str
) -> None:
    """SIGKILL while the script runs. The recovery (start-up under the same RUNNER_ID, or another
    instance's watchdog) failed the row but left its `script` stage `running` and the run manifest
    saying `status: running` for ever, disagreeing with the row and the events."""
    with Cluster(tmp_path / "cluster", database_url) as c:
        data = str(c.tmp / "data-shared")
        a = c.start("stages-a", "worker", RUNNER_DATA_DIR=data)
        [job] = c.submit(1, sleep=60.0)
        wait_for(lambda: c.rows([job])[job]["pid"], 30, "the pid record")  # the row has the stages too
        c.sigkill(a)
        c.start("stages-a" if restart == "same_id" else "stages-b", "worker", RUNNER_DATA_DIR=data)
        wait_for(lambda: c.all_done([job]), 30, "the crashed job to be failed")
        row = c.rows([job])[job]
        code = "recovered_after_crash" if restart == "same_id" else "heartbeat_stale"
        assert (row["status"], row["error_code"]) == ("failed", code)
        assert [e["event_type"] for e in c.events()[job]][-1] == (
            "recovered_after_crash" if restart == "same_id" else "heartbeat_stale_recovered"
        )
        stages = {s["name"]: s for s in row["stages"]}
        assert stages["prepare"]["status"] == "success", stages
        assert stages["script"]["status"] == "failed" and stages["script"]["finished_at"], stages
        assert not {s["status"] for s in stages.values()} & {"running", "pending"}, stages
        path = Path(data) / "runs" / job / "manifest.json"
        # Rewritten right after the row's write: a moment later.
        manifest = wait_for(
            lambda: (doc := json.loads(path.read_text()))["status"] != "running" and doc, 10, "the manifest"
        )
        assert (manifest["status"], manifest["error_code"]) == ("failed", code)
        assert manifest["stages"] == row["stages"]
        check_invariants(c)


@pytest.mark.timeout(120)
def test_a_restart_cleans_up_after_jobs_another_instance_failed_meanwhile(
    database_url: str, tmp_path: Path
) -> None:
    """A dies; B (its own data folder) fails A's job as stale; A starts again under its id. Its
    start-up recovery looked only at its jobs still active, so the job's worktree (registered in
    the source repo, its branch with it) and its `running` manifest stayed on A's disk until
    retention deleted the row, 30 days later."""
    import subprocess

    with Cluster(tmp_path / "cluster", database_url) as c:
        a = c.start("gone-a", "worker")
        [job] = c.submit(1, sleep=60.0, repo="pushed")
        # The ledger, not job_pids: the prepare's git carries the job's id too.
        wait_for(lambda: job in c.ledger_ids(), 30, "the script to start")
        workspace = c.tmp / "data-gone-a" / "workspaces" / job
        assert workspace.is_dir()
        c.sigkill(a)
        c.start("gone-b", "worker")
        wait_for(lambda: c.all_done([job]), 30, "B's watchdog")
        c.start("gone-a", "worker")

        def worktrees() -> str:
            return subprocess.run(
                ["git", "-C", str(c.tmp / "repo"), "worktree", "list"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout

        def branches() -> str:
            return subprocess.run(
                ["git", "-C", str(c.tmp / "repo"), "branch", "--list", "runner/*"],
                capture_output=True,
                text=True,
            ).stdout

        # The branch goes last (it has no commit of its own).
        try:
            wait_for(
                lambda: not workspace.exists() and job not in worktrees() and not branches(),
                30,
                "A to clean up the workspace",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {workspace.exists()}, {worktrees()}, {branches()}") from None
        row = c.rows([job])[job]
        manifest = json.loads(
            (c.tmp / "data-gone-a" / "runs" / job / "manifest.json").read_text()
        )  # before the cleanup
        assert (manifest["status"], manifest["error_code"]) == ("failed", "heartbeat_stale")
        assert manifest["stages"] == row["stages"]
        check_invariants(c)
