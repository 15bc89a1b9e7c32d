"""A cancel that meets a job ending on its own (SPEC §3): the cancel wins, whatever the job's
own outcome, and a job canceled after its script pushes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from codex_runner.execution import job as job_module
from codex_runner.launcher import Launcher

from tests.helpers import fail_elsewhere_when_the_script_ends, wait_until
from tests.integration.conftest import Runner


def _seed_repo(tmp_path: Path) -> Path:
    """A local repo with one commit on `main`."""
    seed = tmp_path / "seed"
    git_id = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(seed)], check=True)
    (seed / "README.md").write_text("hello\n")
    subprocess.run(["git", *git_id, "-C", str(seed), "add", "."], check=True)
    subprocess.run(["git", *git_id, "-C", str(seed), "commit", "-qm", "seed"], check=True)
    return seed


def _committing_repo(seed: Path) -> str:
    """runner.toml: repo `committing` (a worktree of `seed`) and script `change` (adds a file)."""
    return f"""
[repos.committing]
source = "{seed}"
workspace = "worktree"

[scripts.change]
command = ["/bin/sh", "-c", "echo changed > new.txt"]
"""


def _cancel(runner: Runner, job_id: str) -> None:
    r = runner.client.post(f"/api/runner/jobs/{job_id}/cancel")
    assert r.status_code == 202, r.text


def test_a_job_that_fails_on_its_own_after_a_cancel_ends_canceled(
    runner_factory: Callable[..., Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cancel reaches the database but not the job (as when it arrives while the script exits):
    # `cancel_requested` → `failed` is only for an owner that was lost, so the owner's failed
    # write gives way to `canceled`.
    monkeypatch.setattr(Launcher, "_cancel_local", lambda self, job_id: None)

    async def no_poll(self: Launcher) -> None:
        return None

    monkeypatch.setattr(Launcher, "_poll_cancels", no_poll)
    # Nor through a heartbeat, which would see the new status.
    runner = runner_factory(RUNNER_HEARTBEAT_SECONDS="20", RUNNER_STALE_AFTER_SECONDS="60")
    job = runner.submit({"sleep": "1.5", "exit": 3})
    runner.wait(job["id"], {"running"})
    _cancel(runner, job["id"])
    done = runner.wait(job["id"], timeout=30)
    assert (done["status"], done["error_code"]) == ("canceled", "canceled"), done
    # The run manifest says so too: it kept the error of the status the job would have had. It is
    # published right after the status is written, so a moment after the API shows it.
    manifest = runner.runtime.settings.runs_dir / job["id"] / "manifest.json"
    assert wait_until(lambda: json.loads(manifest.read_text()).get("status") == "canceled", timeout=10)
    doc = json.loads(manifest.read_text())
    assert (doc["status"], doc["error_code"]) == ("canceled", "canceled"), doc


def _cancel_during_the_commit(
    runner_factory: Callable[..., Runner],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cancel: Callable[[Runner, str], None],
    **settings: str,
) -> None:
    """A pushing job canceled (by `cancel`) while its commit stage runs ends `canceled`, its commit
    made and its push skipped: nothing reaches the remote."""
    seed = _seed_repo(tmp_path)
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(seed), str(bare)], check=True)
    extra = f"""
[repos.pushed]
source = "file://{bare}"
workspace = "clone"
push = true

[scripts.change]
command = ["/bin/sh", "-c", "echo changed > new.txt"]
"""
    runner = runner_factory(extra_toml=extra, **settings)
    real_commit = job_module.commit_changes
    job_id: list[str] = []

    def commit_after_a_cancel(*args: Any, **kwargs: Any) -> Any:
        # The worker thread of the commit stage: the cancel arrives now, while it commits.
        cancel(runner, job_id[0])
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(job_module, "commit_changes", commit_after_a_cancel)
    job = runner.submit({}, repo="pushed", script="change")
    job_id.append(job["id"])
    done = runner.wait(job["id"], timeout=30)
    assert done["status"] == "canceled", done
    stages = {s["name"]: s["status"] for s in done["stages"]}
    assert stages["commit"] == "success" and stages["push"] == "skipped", stages
    branches = subprocess.run(
        ["git", "-C", str(bare), "branch", "--list", "runner/*"], capture_output=True, text=True, check=True
    )
    assert branches.stdout.strip() == "", "a canceled job pushed its branch"


def test_a_cancel_during_the_commit_stage_pushes_nothing(
    runner_factory: Callable[..., Runner], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cancel_then_wait(runner: Runner, job_id: str) -> None:
        _cancel(runner, job_id)
        time.sleep(0.3)

    _cancel_during_the_commit(runner_factory, tmp_path, monkeypatch, cancel_then_wait)


def test_a_shutdown_during_a_push_that_hangs_ends_the_job_runner_shutdown(
    runner_factory: Callable[..., Runner], tmp_path: Path
) -> None:
    """A stop request reaches a script, not git in a worker thread: a push to a remote that never
    answers held the shutdown (and its process) for up to 30 minutes, and the job stayed running.
    After the grace its git is killed and the job ends `runner_shutdown` (SPEC §3)."""
    import asyncio
    import socket

    from codex_runner import launcher as launcher_module
    from codex_runner.execution.procscan import find_job_processes

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections and never answers
    port = listener.getsockname()[1]
    try:
        seed = _seed_repo(tmp_path)
        subprocess.run(
            ["git", "-C", str(seed), "remote", "add", "origin", f"http://127.0.0.1:{port}/x.git"], check=True
        )
        extra = f"""
[repos.hanging]
source = "{seed}"
workspace = "worktree"
push = true

[scripts.change]
command = ["/bin/sh", "-c", "echo changed > new.txt"]
"""
        runner = runner_factory(extra_toml=extra, RUNNER_KILL_GRACE_SECONDS="1")
        job = runner.submit({}, repo="hanging", script="change")

        manifest = runner.runtime.settings.runs_dir / job["id"] / "manifest.json"

        def pushing() -> bool:
            # The job row's stages are written at the end; the run manifest follows them live.
            try:
                doc = json.loads(manifest.read_text())
            except (OSError, ValueError):
                return False
            return any(s["name"] == "push" and s["status"] == "running" for s in doc["stages"])

        assert wait_until(pushing, timeout=30)
        [launcher] = launcher_module._LIVE
        loop = launcher._loop
        assert loop is not None
        started = time.monotonic()
        asyncio.run_coroutine_threadsafe(launcher.stop(), loop).result(timeout=60)
        assert time.monotonic() - started < 15
        row = runner.runtime.jobs.get_row(job["id"])
        assert row is not None and (row["status"], row["error_code"]) == ("failed", "runner_shutdown"), row
        assert not find_job_processes({job["id"]})
    finally:
        listener.close()


def test_a_job_stopped_before_its_script_started_has_no_exit_code(
    runner_factory: Callable[..., Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC §3: `exit_code` is the process's exit status; canceled during prepare, no process ran
    (it was reported as 0)."""
    real_prepare = job_module.prepare_workspace

    def slow_prepare(*args: Any, **kwargs: Any) -> Any:
        time.sleep(1.5)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(job_module, "prepare_workspace", slow_prepare)
    runner = runner_factory()
    job = runner.submit({}, repo="inplace")
    runner.wait(job["id"], {"running"})
    _cancel(runner, job["id"])
    done = runner.wait(job["id"], timeout=30)
    assert (done["status"], done["error_code"], done["exit_code"]) == ("canceled", "canceled", None), done


def test_the_heartbeat_file_is_touched_while_a_job_stops(runner_factory: Callable[..., Runner]) -> None:
    """SPEC §3: `.heartbeat` is touched on every heartbeat, `cancel_requested` included (a script
    that ignores SIGTERM keeps the job stopping for the whole grace)."""
    runner = runner_factory(RUNNER_KILL_GRACE_SECONDS="4")
    job = runner.submit({"sleep": "30", "ignore_term": True})
    beat = runner.runtime.settings.runs_dir / job["id"] / ".heartbeat"
    assert wait_until(beat.exists, timeout=15)
    _cancel(runner, job["id"])
    seen = set()
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline and runner.job(job["id"])["status"] == "cancel_requested":
        seen.add(beat.stat().st_mtime_ns)
        time.sleep(0.2)
    assert len(seen) >= 2, "the heartbeat file stood still while the job stopped"
    assert runner.wait(job["id"], timeout=30)["status"] == "canceled"


def test_a_shutdown_between_the_scripts_exit_and_its_commit_is_not_a_success(
    runner_factory: Callable[..., Runner], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC §3: `success` is the script's exit 0 and every later stage. The stop came after the
    script and before the commit: the commit and push were skipped and the job said `success`,
    its changes gone with the workspace."""
    seed = _seed_repo(tmp_path)
    extra = _committing_repo(seed)
    real_supervise = job_module.JobRun._supervise

    async def then_a_shutdown(self: Any, *args: Any, **kwargs: Any) -> Any:
        outcome = await real_supervise(self, *args, **kwargs)
        self.request_stop("shutdown")  # the launcher's stop, right as the script ended
        return outcome

    monkeypatch.setattr(job_module.JobRun, "_supervise", then_a_shutdown)
    runner = runner_factory(extra_toml=extra)
    done = runner.wait(runner.submit({}, repo="committing", script="change")["id"], timeout=30)
    assert (done["status"], done["error_code"], done["exit_code"]) == ("failed", "runner_shutdown", 0), done
    stages = {s["name"]: s["status"] for s in done["stages"]}
    assert stages["script"] == "success" and stages["commit"] == stages["push"] == "skipped", stages


def test_an_owner_whose_lease_went_while_its_script_ended_does_not_commit(
    runner_factory: Callable[..., Runner], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frozen past the stale time while its script ended, an instance resumed and committed onto
    the job's branch for a job another instance had already failed: the commit stage begins with a
    fenced write now, and a lost lease stops it."""

    seed = _seed_repo(tmp_path)
    extra = _committing_repo(seed)
    fail_elsewhere_when_the_script_ends(monkeypatch)
    runner = runner_factory(extra_toml=extra)
    job = runner.submit({}, repo="committing", script="change")
    assert wait_until(lambda: runner.job(job["id"])["status"] == "failed", timeout=30)
    time.sleep(1.0)  # long enough for a commit to land, had it gone ahead
    branches = subprocess.run(
        ["git", "-C", str(seed), "branch", "--list", "runner/*"], capture_output=True, text=True, check=True
    )
    assert branches.stdout.strip() == "", "a fenced owner committed"
    assert runner.job(job["id"])["error_code"] == "heartbeat_stale"


def test_a_cancel_during_a_clone_that_never_gets_an_answer_ends_the_job(
    runner_factory: Callable[..., Runner], tmp_path: Path
) -> None:
    """A stop request reaches a script, not git in a worker thread: a job canceled while its clone
    waited on a server that never answers stayed `cancel_requested` (git alive) until git's
    30-minute network timeout. Its git is killed after the kill grace, and the job ends canceled."""
    import socket

    from codex_runner.execution.procscan import find_job_processes

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        extra = f"""
[repos.hang]
source = "http://127.0.0.1:{listener.getsockname()[1]}/x.git"
workspace = "clone"

[scripts.change]
command = ["/bin/sh", "-c", "echo changed > new.txt"]
"""
        runner = runner_factory(extra_toml=extra, RUNNER_KILL_GRACE_SECONDS="1")
        job = runner.submit({}, repo="hang", script="change")
        runner.wait(job["id"], {"running"})
        assert wait_until(lambda: bool(find_job_processes({job["id"]})), timeout=10)  # git is waiting
        _cancel(runner, job["id"])
        done = runner.wait(job["id"], timeout=20)
        assert (done["status"], done["error_code"]) == ("canceled", "canceled"), done
        assert find_job_processes({job["id"]}) == {}
    finally:
        listener.close()


def _slow_switch_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A `git` first on PATH whose switch back to a branch (a checkout without -b, the in_place
    cleanup's) takes 3 s, as on a large tree; returns the real git."""
    import shutil

    real_git = shutil.which("git")
    assert real_git is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "git"
    wrapper.write_text(
        "#!/bin/sh\n"
        'case " $* " in\n'
        '  *" checkout "*" -b "*) ;;\n'
        '  *" checkout "*) sleep 3 ;;\n'
        "esac\n"
        f'exec {real_git} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return real_git


def test_a_cancel_never_kills_the_cleanup_that_puts_an_in_place_repo_back(
    runner_factory: Callable[..., Runner], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job canceled while its script ran stays `cancel_requested` until its terminal write; the
    git kill meant for a hanging clone or push (after the grace) also caught its cleanup's
    `git checkout` back to the original branch, and the in_place repo stayed on the job branch.
    Only the prepare, commit and push stages' git is killed."""
    real_git = _slow_switch_back(tmp_path, monkeypatch)
    runner = runner_factory(RUNNER_KILL_GRACE_SECONDS="1")
    job = runner.submit({"sleep": "30"}, repo="inplace")
    runner.wait(job["id"], {"running"})
    time.sleep(0.5)
    _cancel(runner, job["id"])
    done = runner.wait(job["id"], timeout=60)
    assert done["status"] == "canceled", done
    cleanup = next(s for s in done["stages"] if s["name"] == "cleanup")
    assert cleanup["status"] == "success", cleanup
    branch = subprocess.run(
        [real_git, "-C", str(tmp_path / "repo"), "branch", "--show-current"], capture_output=True, text=True
    ).stdout.strip()
    assert branch == "main"


def test_a_shutdown_never_kills_the_cleanup_that_puts_an_in_place_repo_back(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while a job cleaned up: the shutdown killed every process of the jobs outside their
    script, the cleanup's `git checkout` back to the original branch among them, and the in_place
    repo stayed on the job's branch (every next job failed). Only a stage's git is killed now."""
    from codex_runner.runtime import Runtime
    from codex_runner.server import build_app

    from tests.helpers import serve_app, wait_until
    from tests.integration.conftest import runner_settings

    real_git = _slow_switch_back(tmp_path, monkeypatch)
    runtime = Runtime.open(runner_settings(tmp_path, database_url, RUNNER_KILL_GRACE_SECONDS="1"))
    served = serve_app(build_app(runtime))
    url = served.__enter__()
    try:
        token, _ = runtime.tokens.create("admin", "admin")
        runner = Runner(url, runtime, token, tmp_path)
        job = runner.submit({"sleep": "0.2"}, repo="inplace")
        manifest = runtime.settings.runs_dir / job["id"] / "manifest.json"

        def cleaning_up() -> bool:
            try:
                stages = json.loads(manifest.read_text())["stages"]
            except (OSError, ValueError):
                return False
            return any(s["name"] == "cleanup" and s["status"] == "running" for s in stages)

        assert wait_until(cleaning_up, timeout=30)
        runner.client.close()
    finally:
        served.__exit__(None, None, None)  # the lifespan's shutdown: the launcher stops
    try:
        row = runtime.jobs.get_row(job["id"])
        assert row is not None
        cleanup = next(s for s in row["stages"] if s["name"] == "cleanup")
        assert cleanup["status"] == "success", row
        branch = subprocess.run(
            [real_git, "-C", str(tmp_path / "repo"), "branch", "--show-current"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        assert branch == "main"
    finally:
        runtime.close()


def test_a_fenced_runs_own_in_place_cleanup_is_not_redone_by_a_later_recovery(
    runner_factory: Callable[..., Runner], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance frozen past the stale time finds, once it runs again, that another instance failed
    its in_place job (`heartbeat_stale`): fenced, it puts the repo back itself, the job branch with
    the agent's commit kept. Nothing recorded that cleanup (the row is the watchdog's, a fenced run
    writes none), so a later recovery took the job for one never cleaned up: the start-up of the
    same RUNNER_ID (`clean_up_failed_elsewhere`) or the next in_place job (`_reclaim_in_place`) ran
    it again on an operator who had checked out the kept branch meanwhile — their changes stashed,
    the branch switched under them."""

    from codex_runner.execution.recovery import clean_up_failed_elsewhere

    fail_elsewhere_when_the_script_ends(monkeypatch, stages=True)
    agent = "git add -A && git -c user.name=a -c user.email=a@a commit -qm agent"
    runner = runner_factory(
        extra_toml=f"""
[scripts.agent_commits]
command = ["/bin/sh", "-c", "echo agent > agent.txt && {agent}"]
"""
    )
    repo = tmp_path / "repo"

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    job = runner.submit({}, repo="inplace", script="agent_commits")
    manifest = runner.runtime.settings.runs_dir / job["id"] / "manifest.json"

    def fenced_run_over() -> bool:  # its manifest says how the row ended: its last step
        try:
            return json.loads(manifest.read_text())["error_code"] == "heartbeat_stale"
        except (OSError, ValueError, KeyError):
            return False

    assert wait_until(fenced_run_over, timeout=30)
    branch = f"runner/{job['id'][:8]}"
    assert git("branch", "--show-current") == "main"  # put back by the fenced run itself
    assert git("branch", "--list", branch)  # kept: the agent's commit is on it

    # The operator looks at the agent's work, and edits.
    git("checkout", "-q", branch)
    (repo / "agent.txt").write_text("the operator's edit\n")
    row = runner.runtime.jobs.get_row(job["id"])
    assert row is not None and row["error_code"] == "heartbeat_stale"
    clean_up_failed_elsewhere(row, runner.runtime.catalog, runner.runtime.settings)  # a restart's

    assert git("branch", "--show-current") == branch
    assert (repo / "agent.txt").read_text() == "the operator's edit\n"
    assert git("stash", "list") == ""


def test_a_cancel_made_on_another_instance_during_the_commit_pushes_nothing(
    runner_factory: Callable[..., Runner], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, with the cancel taken by another instance's API (an API-only `serve` before
    workers): this launcher hears of it only at its next poll of cancels, and the push went ahead
    in the meantime; the job ended `canceled` with its branch on the remote."""
    import sqlalchemy as sa

    from codex_runner.store.schema import jobs as jobs_table

    def cancel_elsewhere(runner: Runner, job_id: str) -> None:
        with runner.runtime.engine.begin() as conn:  # the other instance's cancel, as it writes it
            conn.execute(
                sa.update(jobs_table).where(jobs_table.c.id == job_id).values(status="cancel_requested")
            )

    # No poll of cancels during the test: only the row says the job is being canceled.
    _cancel_during_the_commit(
        runner_factory, tmp_path, monkeypatch, cancel_elsewhere, RUNNER_POLL_INTERVAL_SECONDS="60"
    )
