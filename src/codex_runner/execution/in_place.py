"""The `in_place` mode: the repo's own folder, switched to the job branch (its tree must be clean), and
put back on the branch it was on when the job ends, or when a run that never recorded its workspace
is cleaned up (`unrecorded_in_place`)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from codex_runner.config import Settings
from codex_runner.execution import git
from codex_runner.execution.git import GitError, run_git
from codex_runner.execution.gitutil import (
    filter_guard,
    head_ref,
    nested_guard,
    rebased_or_head_ref,
    remove_stale_locks,
    repo_lock,
    resolve,
    run_in,
    try_resolve,
)
from codex_runner.execution.workspace_base import (
    RepoLike,
    Workspace,
    check_git_dir,
    delete_branch_if_unchanged,
    delete_branch_without_commits,
    first_few,
    local_git_dir,
    repo_lock_key,
)

log = structlog.get_logger("codex_runner.workspace")


# --- prepare ----------------------------------------------------------------------------------------


def prepare_in_place(
    repo: RepoLike,
    job_id: str,
    source: Path,
    store: Path,
    base_branch: str,
    base_commit: str,
    branch: str,
    home: Path,
) -> Workspace:
    # An earlier job's agent could write this repo's config (`filter_guard`), and that of the
    # repositories it links to, which `status` looks inside (`nested_guard`).
    guard = nested_guard(store, source, home, "prepare_failed", filter_guard(store, home))
    # A dirty tree would end up in the job's commit, mixed with the agent's work: refuse it.
    status = run_in(
        store,
        source,
        ["status", "--porcelain", "-z", "--untracked-files=normal"],
        home,
        "prepare_failed",
        guard=guard,
    )
    if status.stdout:
        raise GitError(
            "in_place repo has uncommitted changes; commit or stash them first", code="prepare_failed"
        )
    _refuse_assumed_unchanged(store, source, home, guard)
    head = run_git([f"--git-dir={store}", "symbolic-ref", "-q", "HEAD"], home=home, check=False)
    original = head.stdout.strip() if head.returncode == 0 else resolve(store, "HEAD", home)
    if original.startswith("refs/heads/runner/"):
        # Another job's branch: a job of another catalog repo on the same folder runs, or a
        # cleanup failed. Taking the folder would mix the two jobs' work.
        raise GitError(
            f"in_place repo is on the job branch {original.removeprefix('refs/heads/')}: another job "
            "uses this folder, a job's cleanup did not finish, or a job's state was kept for inspection "
            "(RUNNER_CLEANUP_AFTER_JOB=false, RUNNER_KEEP_FAILED_WORKSPACES=true); check it out back to "
            "its branch",
            code="prepare_failed",
        )
    same_tree = try_resolve(store, "HEAD", home) == base_commit
    # Ignored files are the operator's (local settings, build output): a checkout overwrites one
    # the base tracks, and the switch back at cleanup would then delete it. Refused instead.
    run_in(
        store,
        source,
        ["checkout", "-q", "--no-overwrite-ignore", "-b", branch, base_commit],
        home,
        "branch_failed",
        guard=guard,
    )
    if not same_tree:
        _refuse_unignored(store, source, home, guard, original, branch, base_branch, base_commit)
    return Workspace(
        source, "in_place", branch, base_branch, base_commit, job_id, home, store, store, original
    )


def _refuse_assumed_unchanged(
    store: Path, source: Path, home: Path, guard: Sequence[tuple[str, str]]
) -> None:
    """An in_place repo with files marked `--assume-unchanged` (a way to keep local changes to a
    tracked file out of commits) is refused: git hides their changes from `status`, so the tree
    looks clean, the job's commit would leave out its own edits to them, and the cleanup's
    `reset --hard` writes them over, the operator's changes gone. (`--skip-worktree`, the other
    way, is safe: the reset leaves those files alone.)"""
    listed = run_in(store, source, ["ls-files", "-v", "-z"], home, "prepare_failed", guard=guard).stdout
    # `ls-files -v` tags an entry with a lower-case letter when it is marked assume-unchanged.
    marked = [entry[2:] for entry in listed.split("\0") if entry[:1].islower()]
    if marked:
        raise GitError(
            f"in_place repo: {first_few(marked)} marked --assume-unchanged: git hides their changes, and the job's "
            "cleanup would write over them; `git update-index --no-assume-unchanged` them, and commit "
            "or stash what they hold",
            code="prepare_failed",
        )


def _refuse_unignored(
    store: Path,
    source: Path,
    home: Path,
    guard: Sequence[tuple[str, str]],
    original: str,
    branch: str,
    base_branch: str,
    base_commit: str,
) -> None:
    """Once an in_place repo is on a job branch made from another commit than it was on: the
    base's `.gitignore` may not ignore what the operator's branch did (a `.env`), and the tree,
    clean before, then shows the operator's files as untracked: the job's `add -A` would commit
    them, and the push publish them. Then the repo goes back and the job fails (`prepare_failed`)."""
    guard = nested_guard(store, source, home, "prepare_failed", guard)
    status = ["status", "--porcelain", "-z", "--untracked-files=normal"]
    shown = run_in(store, source, status, home, "prepare_failed", guard=guard).stdout
    paths = [entry[3:] for entry in shown.split("\0") if len(entry) > 3]
    if not paths:
        return
    run_in(store, source, _checkout_back(original, force=False), home, "prepare_failed", guard=guard)
    delete_branch_if_unchanged(store, branch, base_commit, home)
    names = first_few(paths)
    where = original.removeprefix("refs/heads/")
    raise GitError(
        f"in_place repo: {names} ignored on {where} but not on the repo's branch {base_branch}: the "
        "job's commit would take them in (and the push publish them); ignore them there too "
        "(.gitignore, or .git/info/exclude) or move them away",
        code="prepare_failed",
    )


# --- cleanup ----------------------------------------------------------------------------------------


def cleanup_in_place(ws: Workspace, repo: RepoLike, settings: Settings, *, recovering: bool = False) -> None:
    assert ws.git_dir is not None and ws.branch is not None and ws.base_commit is not None
    check_git_dir(ws, "cleanup_failed")  # a reset and checkout must not land in another repository
    with repo_lock(settings, repo_lock_key(repo)):
        head = rebased_or_head_ref(ws.git_dir)
        if head != f"refs/heads/{ws.branch}" and (
            recovering or (head or "").startswith("refs/heads/runner/")
        ):
            # Another job's branch (it took the folder once this one was failed), or, after a crash
            # or a lost lease, anything but this job's own: not this job's to reset.
            log.warning("in_place_cleanup_skipped", job_id=ws.job_id, head=head)
            delete_branch_if_unchanged(ws.git_dir, ws.branch, ws.base_commit, ws.home)
            return
        original = ws.original_ref or ws.base_commit
        if head == original:
            # Already back (another instance's recovery did it while this run was frozen, and the
            # operator may work there now): nothing to switch, nothing of the job's to drop.
            log.warning("in_place_cleanup_skipped", job_id=ws.job_id, head=head)
            delete_branch_if_unchanged(ws.git_dir, ws.branch, ws.base_commit, ws.home)
            return
        # Off the job's branch (the agent switched branches), what is uncommitted may not be the
        # job's: kept in a stash, never dropped.
        keep = recovering or head != f"refs/heads/{ws.branch}"
        _restore_in_place(ws.git_dir, ws.path, ws.branch, ws.job_id, original, ws.home, settings, keep)
        delete_branch_if_unchanged(ws.git_dir, ws.branch, ws.base_commit, ws.home)


def _restore_in_place(
    git_dir: Path,
    path: Path,
    branch: str,
    job_id: str,
    original: str,
    home: Path,
    settings: Settings,
    recovering: bool,
) -> None:
    """Puts an in_place repo on the job's branch back on `original` (a ref or a commit). What is
    left uncommitted goes: dropped after the job's own run (it is the job's, the tree was clean
    when it began); kept in a stash entry naming the job when recovering (a crash, a lost lease, a
    watchdog's verdict), since by then someone else may have written there too. Under the repo lock."""
    # A git the runner killed (a cancel's, a shutdown's, a crash's) leaves its lock file, and
    # every command below would fail on it: the job's processes are gone, so nobody holds it.
    removed = remove_stale_locks(git_dir, path, branch)
    if removed:
        log.warning("stale_git_locks_removed", job_id=job_id, locks=removed)
    guard = filter_guard(git_dir, home)  # the agent could write this config
    if recovering:
        # A stash looks inside nested repositories as `add` does (`nested_guard`).
        guard = nested_guard(git_dir, path, home, "cleanup_failed", guard)
        identity = {
            "GIT_AUTHOR_NAME": settings.git_author_name,
            "GIT_AUTHOR_EMAIL": settings.git_author_email,
            "GIT_COMMITTER_NAME": settings.git_author_name,
            "GIT_COMMITTER_EMAIL": settings.git_author_email,
        }
        # A merge, cherry-pick or revert the job left half done: `stash` refuses unmerged paths,
        # and a MERGE_HEAD left behind would turn the operator's next commit into a merge. Its
        # files go to the stash as they are (conflict markers and all), the operation is dropped.
        if run_in(git_dir, path, ["ls-files", "-u", "-z"], home, "cleanup_failed", guard=guard).stdout:
            run_in(git_dir, path, ["add", "-A"], home, "cleanup_failed", guard=guard)
        _quit_operations(git_dir, path, home, guard)
        message = f"codex-runner: left uncommitted on {branch} by job {job_id} (recovered)"
        stash = ["stash", "push", "--include-untracked", "-q", "-m", message]
        _stash_push(git_dir, path, stash, home, guard, identity)
    else:
        _quit_operations(git_dir, path, home, guard)
        run_in(git_dir, path, ["reset", "--hard", "-q"], home, "cleanup_failed", guard=guard)
    run_in(git_dir, path, _checkout_back(original, force=not recovering), home, "cleanup_failed", guard=guard)
    if not recovering:
        # Only once back, under the ignore rules of the operator's branch: the job's branch may
        # no longer ignore the operator's files (a `.env` its `.gitignore` dropped), and `clean`
        # there deleted them for good.
        run_in(git_dir, path, ["clean", "-fdq"], home, "cleanup_failed", guard=guard)


def _checkout_back(original: str, *, force: bool) -> list[str]:
    """The checkout that puts an in_place repo back on `original` (a ref or a commit).

    Not `--no-overwrite-ignore` (the checkout to the job branch has it): a file the original
    branch tracks and the job branch stopped tracking (now ignored) must come back, or the repo
    would stay on the job branch and every later job on it fail. `force` (the job's own cleanup,
    after its `reset --hard`): an untracked file in the way is the job's, at a path the original
    branch tracks and the tree had clean when the job began, so that version comes back."""
    forced = ["-f"] if force else []
    if original.startswith("refs/heads/"):
        return ["checkout", "-q", *forced, original.removeprefix("refs/heads/")]
    return ["checkout", "-q", *forced, "--detach", original]


#: What an operation stopped half way (on a conflict, or an `edit` step) leaves in a git dir, and
#: the command that forgets it: `--quit` leaves HEAD, the index and the files as they are. Left
#: in an in_place repo, the operator's `git status` would show the job's operation in progress,
#: and `git rebase --abort` there would check the job branch out again, dropping their changes.
#: `am` before `rebase`: both keep `rebase-apply`, and `rebase --quit` refuses an `am`'s.
_OPERATIONS = (
    ("MERGE_HEAD", "merge"),
    ("CHERRY_PICK_HEAD", "cherry-pick"),
    ("REVERT_HEAD", "revert"),
    ("sequencer", "cherry-pick"),  # a pick or revert of several commits (both use this folder)
    ("rebase-apply/applying", "am"),
    ("rebase-apply", "rebase"),
    ("rebase-merge", "rebase"),
)


def _quit_operations(git_dir: Path, path: Path, home: Path, guard: Sequence[tuple[str, str]]) -> None:
    """Ends every merge, cherry-pick, revert, rebase or `am` the job left half done (`_OPERATIONS`);
    `cleanup_failed` naming the one whose state stays."""
    for state, command in _OPERATIONS:
        if os.path.lexists(git_dir / state):
            run_in(git_dir, path, [command, "--quit"], home, "cleanup_failed", guard=guard, check=False)
            if os.path.lexists(git_dir / state):
                raise GitError(
                    f"the job left a {command} in progress and `git {command} --quit` did not end it "
                    f"(.git/{state} stays)",
                    code="cleanup_failed",
                )
    # `rebase --quit` keeps the stopped step's commit there (git 2.39): nothing reads it after.
    if os.path.lexists(git_dir / "REBASE_HEAD"):
        (git_dir / "REBASE_HEAD").unlink()


def _stash_push(
    git_dir: Path,
    path: Path,
    args: list[str],
    home: Path,
    guard: Sequence[tuple[str, str]],
    env: dict[str, str],
) -> None:
    """`git stash push`, tried again for a moment when it fails without a word: that is how it
    fails (git 2.39, REFRESH_QUIET) when another git holds `index.lock` for its first index refresh,
    before it has done anything, so `run_git`, which goes by git's message, cannot tell. An
    editor's `git status` polling the repo is enough. The wait is `run_git`'s, read through the
    module at each call, so that the one setting governs both."""
    deadline = time.monotonic() + git.LOCK_RETRY_SECONDS
    while True:
        got = run_in(git_dir, path, args, home, "cleanup_failed", guard=guard, env_extra=env, check=False)
        if got.returncode == 0:
            return
        if got.stderr.strip() or time.monotonic() >= deadline:
            detail = got.stderr.strip() or f"exit status {got.returncode}"
            raise GitError(f"git stash failed: {detail}", code="cleanup_failed", exit_code=got.returncode)
        time.sleep(0.05)


def unrecorded_in_place(repo: RepoLike, job_id: str, branch: str, settings: Settings, home: Path) -> bool:
    source = Path(repo.source)
    if not source.is_dir():
        return False
    git_dir = local_git_dir(source, home, "cleanup_failed")
    with repo_lock(settings, repo_lock_key(repo)):
        if head_ref(git_dir) != f"refs/heads/{branch}":
            return False  # the prepare never got to its checkout: the repo is as the operator left it
        before = run_git(
            [f"--git-dir={git_dir}", "rev-parse", "--symbolic-full-name", "@{-1}"], home=home, check=False
        ).stdout.strip()
        if not before.startswith("refs/heads/") or before == f"refs/heads/{branch}":
            before = try_resolve(git_dir, "@{-1}", home) or ""
        if not before and repo.branch and try_resolve(git_dir, f"refs/heads/{repo.branch}", home):
            before = f"refs/heads/{repo.branch}"  # no reflog to tell: the repo's configured branch
        if not before:
            raise GitError(
                f"cannot tell which branch {source} was on before {branch}: check it out back",
                code="cleanup_failed",
            )
        _restore_in_place(git_dir, source, branch, job_id, before, home, settings, recovering=True)
        delete_branch_without_commits(git_dir, branch, home)
    return True
