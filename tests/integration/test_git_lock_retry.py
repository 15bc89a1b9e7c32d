"""The runner's git tries a command again for a moment when another git holds one of the
repository's index lock: an editor's or IDE's `git status` (which refreshes the index, taking
`index.lock`) polls an in_place repo every few seconds, and the runner's checkout, commit, stash or
reset failed at once on it (a recovery's cleanup then left the repo on the job's branch)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from codex_runner.execution import git as git_module
from codex_runner.execution.git import GitError, run_git

from tests.helpers import make_git_repo


@dataclass(frozen=True)
class _Repo:
    """The part of a catalog repo the workspace layer reads (`RepoLike`)."""

    source: str
    source_type: str = "local_path"
    branch: str | None = "main"
    workspace: str = "in_place"
    push: bool = False


def _lock_for(path: Path, seconds: float) -> threading.Thread:
    """Another git's lock file, held `seconds` (as `git status` holds `index.lock`), in a thread."""
    path.write_text("")

    def release() -> None:
        time.sleep(seconds)
        path.unlink()

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    return thread


def test_a_command_waits_for_a_lock_another_git_holds_for_a_moment(tmp_path: Path) -> None:
    repo = make_git_repo(tmp_path / "repo")
    (repo / "new.txt").write_text("new\n")
    holder = _lock_for(repo / ".git" / "index.lock", 0.4)
    started = time.monotonic()
    run_git(["add", "-A"], cwd=repo, home=tmp_path / "home", error_code="commit_failed")
    assert time.monotonic() - started >= 0.3  # it did meet the lock, and waited it out
    holder.join(timeout=5)
    staged = run_git(["diff", "--cached", "--name-only"], cwd=repo, home=tmp_path / "home").stdout
    assert staged.split() == ["new.txt"]


def test_a_checkout_to_a_new_branch_waits_for_the_index(tmp_path: Path) -> None:
    """The in_place prepare's command: it takes the index's lock before it makes the branch, so
    trying it again repeats nothing (a ref's lock, met after the branch is made, is not retried)."""
    repo = make_git_repo(tmp_path / "repo")
    holder = _lock_for(repo / ".git" / "index.lock", 0.4)
    run_git(["checkout", "-q", "-b", "runner/0000abcd"], cwd=repo, home=tmp_path / "home")
    holder.join(timeout=5)
    assert (repo / ".git" / "HEAD").read_text().strip() == "ref: refs/heads/runner/0000abcd"


def test_a_lock_that_stays_still_fails_with_gits_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(git_module, "LOCK_RETRY_SECONDS", 0.5)
    repo = make_git_repo(tmp_path / "repo")
    (repo / ".git" / "index.lock").write_text("")  # a killed git's: nobody removes it
    (repo / "new.txt").write_text("new\n")
    started = time.monotonic()
    with pytest.raises(GitError) as caught:
        run_git(["add", "-A"], cwd=repo, home=tmp_path / "home", error_code="commit_failed")
    assert 0.3 <= time.monotonic() - started < 10
    assert caught.value.code == "commit_failed" and "index.lock': File exists" in str(caught.value)


def test_other_failures_are_not_tried_again(tmp_path: Path) -> None:
    repo = make_git_repo(tmp_path / "repo")
    started = time.monotonic()
    with pytest.raises(GitError, match="pathspec"):
        run_git(["checkout", "-q", "no-such-branch"], cwd=repo, home=tmp_path / "home")
    assert time.monotonic() - started < 2


def test_a_recovering_stash_against_a_lock_that_stays_waits_the_one_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recovery's `git stash push` fails without a word on a held `index.lock` and is tried
    again by a loop of its own (`in_place._stash_push`). Its wait is `git.LOCK_RETRY_SECONDS` too:
    it had imported the value, so changing the setting left that wait at the default 3 s."""
    from codex_runner.config import Settings
    from codex_runner.execution.workspace import cleanup_workspace, prepare_workspace

    monkeypatch.setattr(git_module, "LOCK_RETRY_SECONDS", 0.5)
    local = make_git_repo(tmp_path / "repo")
    settings = Settings(data_dir=tmp_path / "data", workspace_dir=tmp_path / "data" / "workspaces")
    repo = _Repo(str(local))
    ws = prepare_workspace(repo, "31313131-a", settings)
    (local / "README.md").write_text("half-done by the job\n")
    lock = local / ".git" / "index.lock"
    # Held open for the whole cleanup, as a hung git holds it: the stale-lock sweep leaves it.
    with open(lock, "w"):
        started = time.monotonic()
        with pytest.raises(GitError) as caught:
            cleanup_workspace(ws, repo, settings, failed=True, recovering=True)
        waited = time.monotonic() - started
    lock.unlink()
    assert caught.value.code == "cleanup_failed" and "git stash failed" in str(caught.value)
    assert waited < 2.5  # the 0.5 s set, not the default 3 s
