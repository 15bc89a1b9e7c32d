"""A job whose commit or push stage fails, run end to end by a real launcher: its status, its
stages, and what reaches the remote."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import Runner
from tests.integration.test_cancel_edges import _seed_repo

#: Scaffolding as some tools do it: a repository of its own in a subfolder, with a commit.
SCAFFOLD = (
    "mkdir app && echo hi > app/main.py && git init -q app && git -C app add -A"
    " && git -C app -c user.name=t -c user.email=t@e commit -qm scaffold && echo changed > README.md"
)


def _remote_branches(bare: Path) -> str:
    listed = subprocess.run(
        ["git", "-C", str(bare), "branch", "--list", "runner/*"], capture_output=True, text=True, check=True
    )
    return listed.stdout.strip()


def test_a_job_whose_commit_fails_is_failed_commit_failed_and_pushes_nothing(
    runner_factory: Callable[..., Runner], tmp_path: Path
) -> None:
    """The commit stage refuses a folder the agent made a repository (it would commit a link to a
    commit that is never pushed): the job ends `failed` with `commit_failed` and the reason, the
    push is skipped (nothing of the job's reaches the remote), and the workspace is cleaned up."""
    seed = _seed_repo(tmp_path)
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(seed), str(bare)], check=True)
    extra = f"""
[repos.pushed]
source = "file://{bare}"
workspace = "clone"
push = true

[scripts.scaffold]
command = ["/bin/sh", "-c", "{SCAFFOLD}"]
"""
    runner = runner_factory(extra_toml=extra)
    job = runner.submit({}, repo="pushed", script="scaffold")
    done = runner.wait(job["id"], timeout=60)
    assert (done["status"], done["error_code"]) == ("failed", "commit_failed"), done
    assert "app: a git repository of its own" in done["error_message"], done["error_message"]
    assert done["exit_code"] == 0
    stages = {s["name"]: s["status"] for s in done["stages"]}
    assert (stages["script"], stages["commit"], stages["push"]) == ("success", "failed", "skipped"), stages
    assert stages["cleanup"] == "success", stages
    assert _remote_branches(bare) == ""
    assert not (runner.runtime.settings.workspace_dir / job["id"]).exists()


def test_a_push_to_an_origin_outside_the_allowlist_fails_the_job_and_reaches_nothing(
    runner_factory: Callable[..., Runner], tmp_path: Path
) -> None:
    """A local repo pushes to its `remote.origin.url`; one outside RUNNER_ALLOWED_REPO_PATHS is a
    place the operator did not allow: the push stage fails, the job ends `failed` with
    `push_failed` and says why, its commit stays on the local job branch, and the remote is
    untouched."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    seed = _seed_repo(allowed)
    outside = tmp_path / "outside" / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(seed), str(outside)], check=True)
    subprocess.run(["git", "-C", str(seed), "remote", "add", "origin", str(outside)], check=True)
    extra = f"""
[repos.local]
source = "{seed}"
workspace = "worktree"
push = true

[scripts.change]
command = ["/bin/sh", "-c", "echo changed > new.txt"]
"""
    runner = runner_factory(extra_toml=extra, RUNNER_ALLOWED_REPO_PATHS=f"{allowed}:{tmp_path / 'repo'}")
    job = runner.submit({}, repo="local", script="change")
    done = runner.wait(job["id"], timeout=60)
    assert (done["status"], done["error_code"]) == ("failed", "push_failed"), done
    assert "outside RUNNER_ALLOWED_REPO_PATHS" in done["error_message"], done["error_message"]
    stages = {s["name"]: s["status"] for s in done["stages"]}
    assert (stages["commit"], stages["push"]) == ("success", "failed"), stages
    assert done["result"]["commit"] and not done["result"].get("pushed"), done["result"]
    assert _remote_branches(outside) == ""
    branch = f"refs/heads/runner/{job['id'][:8]}"
    kept = subprocess.run(["git", "-C", str(seed), "rev-parse", branch], capture_output=True, text=True)
    assert kept.stdout.strip() == done["result"]["commit"]
