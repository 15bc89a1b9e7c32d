"""The runner's git tries a command again for a moment when another git holds one of the
repository's index lock: an editor's or IDE's `git status` (which refreshes the index, taking
`index.lock`) polls an in_place repo every few seconds, and the runner's checkout, commit, stash or
reset failed at once on it (a recovery's cleanup then left the repo on the job's branch)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from codex_runner.execution import git as git_module
from codex_runner.execution.git import GitError, run_git

from tests.helpers import make_git_repo


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
