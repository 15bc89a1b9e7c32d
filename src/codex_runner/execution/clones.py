"""The `worktree` and `clone` modes: making one (`git worktree add`, or a clone sharing a URL repo's
mirror objects), removing one (a clone's commits are kept in the repo it came from), and the warm
spares asked for at start-up (`prewarm_spares`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

import structlog

from codex_runner.config import Settings
from codex_runner.execution.git import GitError, run_git, without_user
from codex_runner.execution.gitutil import (
    filter_guard,
    git_out,
    lock_key,
    repo_lock,
    resolve,
    run_in,
    try_resolve,
)
from codex_runner.execution.mirror import mirror_path
from codex_runner.execution.spares import SpareSource, refill_later
from codex_runner.execution.workspace_base import (
    RepoLike,
    Workspace,
    delete_branch_if_unchanged,
    git_dir_problem,
    local_base,
    new_folder,
    remove_tree,
    repo_lock_key,
    task_home,
)

log = structlog.get_logger("codex_runner.workspace")


# --- prepare ----------------------------------------------------------------------------------------


def make_worktree(
    settings: Settings,
    key: str,
    store: Path,
    root: Path,
    path: Path,
    branch: str,
    base_commit: str,
    home: Path,
) -> Path:
    """`git worktree add` of the base commit on the job branch; returns the worktree's git dir."""
    new_folder(root, path)
    try:
        with repo_lock(settings, key):
            path.rmdir()  # `worktree add` creates it; the folder only proved the name was free
            add = ["worktree", "add", "-q", "--no-checkout", "-b", branch, "--", str(path), base_commit]
            run_git([f"--git-dir={store}", *add], home=home, error_code="branch_failed")
        git_dir = Path(git_out(["-C", str(path), "rev-parse", "--absolute-git-dir"], home, "branch_failed"))
        # The checkout of many files runs outside the lock, in parallel with other jobs' checkouts.
        # The store's config is shared with earlier jobs' agents (`filter_guard`).
        run_in(
            git_dir, path, ["reset", "--hard", "-q"], home, "branch_failed", guard=filter_guard(git_dir, home)
        )
        return git_dir
    except BaseException:
        with contextlib.suppress(GitError):  # the original error says why
            remove_tree(path, root)
        with repo_lock(settings, key):
            run_git([f"--git-dir={store}", "worktree", "prune"], home=home, check=False)
            delete_branch_if_unchanged(store, branch, base_commit, home)
        raise


def shared_clone(
    mirror: Path, path: Path, source: str, base_branch: str, base_commit: str, branch: str, home: Path
) -> Path:
    """`git clone --shared` by hand: borrow the mirror's objects, copy two refs instead of all of them
    (a big repo has thousands of branches and tags), and name the real URL as origin."""
    run_git(["init", "-q", "--", str(path)], home=home, error_code="clone_failed")
    git_dir = path / ".git"
    (git_dir / "objects" / "info" / "alternates").write_text(f"{mirror / 'objects'}\n")
    run_git(
        [f"--git-dir={git_dir}", "config", "remote.origin.url", source], home=home, error_code="clone_failed"
    )
    run_git(
        [f"--git-dir={git_dir}", "config", "remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*"],
        home=home,
        error_code="clone_failed",
    )
    run_git(
        [f"--git-dir={git_dir}", "update-ref", f"refs/remotes/origin/{base_branch}", base_commit],
        home=home,
        error_code="clone_failed",
    )
    run_in(git_dir, path, ["checkout", "-q", "-b", branch, base_commit], home, "branch_failed")
    return git_dir


def prewarm_spares(repos: Iterable[RepoLike], settings: Settings) -> int:
    """At start-up: asks for a warm spare of every `clone`/`worktree` repo whose objects are
    already here (a local repo, or a URL repo's mirror from an earlier life) at its base commit as
    the runner last saw it, so the first job after a restart need not write the whole tree. No
    network: a URL repo without a configured branch or without a mirror waits for its first job.
    Returns how many were asked for; the builds run in the background."""
    if settings.warm_workspaces <= 0:
        return 0
    asked = 0
    with task_home(settings, "prewarm") as home:
        for repo in repos:
            try:
                src = _spare_source_now(repo, settings, home)
            except (GitError, OSError) as exc:
                log.info("spare_prewarm_skipped", repo=lock_key(repo.source), error=str(exc)[:200])
                continue
            if src is not None:
                refill_later(settings, src)
                asked += 1
    return asked


def _spare_source_now(repo: RepoLike, settings: Settings, home: Path) -> SpareSource | None:
    """The spare a job of `repo` would ask for, from what is here now; None if it has none.
    Raises `GitError` when the repo's base cannot be resolved."""
    key = repo_lock_key(repo)
    if repo.source_type == "git_url" and repo.workspace in ("clone", "worktree"):
        mirror = mirror_path(repo, settings)
        if not repo.branch or not mirror.is_dir():
            return None
        commit = resolve(mirror, f"refs/remotes/origin/{repo.branch}", home)
        return SpareSource(key, repo.workspace, mirror, without_user(repo.source), commit)
    if repo.source_type == "local_path" and repo.workspace in ("clone", "worktree"):
        source, store, _, commit = local_base(repo, home)
        return SpareSource(key, repo.workspace, store, str(source), commit, repo.workspace == "clone")
    return None


# --- cleanup ----------------------------------------------------------------------------------------


def cleanup_worktree(ws: Workspace, repo: RepoLike, settings: Settings, root: Path) -> None:
    assert ws.store is not None and ws.branch is not None and ws.base_commit is not None
    with repo_lock(settings, repo_lock_key(repo)):
        run_git(
            [f"--git-dir={ws.store}", "worktree", "remove", "--force", "--force", "--", str(ws.path)],
            home=ws.home,
            check=False,
        )
        remove_tree(ws.path, root)
        run_git([f"--git-dir={ws.store}", "worktree", "prune"], home=ws.home, check=False)
        delete_branch_if_unchanged(ws.store, ws.branch, ws.base_commit, ws.home)


def cleanup_clone(ws: Workspace, repo: RepoLike, settings: Settings, root: Path) -> None:
    assert ws.store is not None and ws.git_dir is not None and ws.branch is not None
    problem = git_dir_problem(ws)
    tip = None if problem else try_resolve(ws.git_dir, f"refs/heads/{ws.branch}", ws.home)
    if problem:  # nothing the runner made is in there (its commit refused): the folder just goes
        log.warning("workspace_git_dir_replaced", job_id=ws.job_id, problem=problem)
    if tip is not None and tip != ws.base_commit:
        # The clone goes away, its commits stay: the job branch is kept in the mirror (or local repo).
        with repo_lock(settings, repo_lock_key(repo)):
            ref = f"refs/heads/{ws.branch}"
            try:
                run_git(
                    [
                        f"--git-dir={ws.store}",
                        "fetch",
                        "-q",
                        "--no-tags",
                        "--",
                        str(ws.git_dir),
                        f"{ref}:{ref}",
                    ],
                    home=ws.home,
                    error_code="cleanup_failed",
                )
            except GitError as exc:
                # The job's commits are in this folder alone now: it stays (retention removes it
                # with the job), and the error says where they are.
                raise GitError(
                    f"{exc.message}; the job branch's commits stay in the workspace folder {ws.path}",
                    code="cleanup_failed",
                ) from None
    remove_tree(ws.path, root)
