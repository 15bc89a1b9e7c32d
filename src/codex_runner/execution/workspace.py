"""One job's workspace: the four modes, the mirror cache of URL repos, commit, push, and cleanup
(SPEC §6). Synchronous on purpose; the launcher calls these through `asyncio.to_thread`.

- `worktree`: `git worktree add` of the base commit on the job branch, in the local repo (or in the
  mirror of a URL repo).
- `clone`: a clone of the base commit. URL repos are cloned from the local mirror, sharing its objects
  (nothing is copied); local repos with `git clone` (hard links).
- `in_place`: the repo's own folder, switched to the job branch (its tree must be clean).
- `scratch`: an empty folder, no git.

URL repos are fetched once into `<data dir>/mirrors/<repo>-<hash>.git` and refreshed with one
`git fetch --prune` per job under a per-repo file lock, so a second job never downloads the repo again.
Pushes run from a throw-away bare repository that borrows the workspace's objects: a credential never
meets a configuration file the agent could have edited.

This module is the entry point the rest of the runner imports, and picks the mode; the modes' own
work lives in `clones` (worktree, clone), `in_place`, `mirror` (the mirror cache) and `commit`
(commit and push), and what they share in `workspace_base`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from codex_runner.config import Settings
from codex_runner.execution.clones import (
    cleanup_clone,
    cleanup_worktree,
    make_worktree,
    prewarm_spares,
    shared_clone,
)
from codex_runner.execution.commit import commit_changes, push_branch
from codex_runner.execution.git import (
    GitCredential,
    GitError,
    run_git,
    validate_ref_name,
    validate_source,
    without_user,
)
from codex_runner.execution.gitutil import lock_key, real_dir, repo_lock, resolve, run_in
from codex_runner.execution.in_place import cleanup_in_place, prepare_in_place, unrecorded_in_place
from codex_runner.execution.mirror import mirror_path, remote_default_branch, sync_mirror, upkeep_mirror
from codex_runner.execution.spares import SpareSource, refill_later, run_in_background, take_spare
from codex_runner.execution.workspace_base import (
    TASK_HOME_KINDS,
    CommitResult,
    RepoLike,
    Workspace,
    delete_branch_without_commits,
    delete_tree,
    local_base,
    local_git_dir,
    new_folder,
    remove_tree,
    repo_lock_key,
)
from codex_runner.jobs import job_branch

__all__ = [
    "MODES",
    "TASK_HOME_KINDS",
    "CommitResult",
    "GitCredential",
    "GitError",
    "RepoLike",
    "Workspace",
    "cleanup_unrecorded",
    "cleanup_workspace",
    "commit_changes",
    "delete_tree",
    "lock_key",
    "prepare_workspace",
    "prewarm_spares",
    "push_branch",
    "validate_ref_name",
    "validate_source",
    "workspace_from_record",
    "workspace_record",
]


MODES = ("worktree", "clone", "in_place", "scratch")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# --- prepare ----------------------------------------------------------------------------------------


def prepare_workspace(
    repo: RepoLike, job_id: str, settings: Settings, credential: GitCredential | None = None
) -> Workspace:
    """Makes the job's workspace and its branch. Raises `GitError` (clone_failed, branch_failed,
    prepare_failed); nothing half-made is left behind."""
    try:
        return _prepare_workspace(repo, job_id, settings, credential)
    except OSError as exc:
        # A folder the runner makes itself (the workspace of a scratch job, a git HOME) on a disk
        # out of space or inodes, or read-only: the job's prepare failed, the runner did not.
        where = f" ({exc.filename})" if exc.filename else ""
        raise GitError(
            f"cannot make the workspace: {exc.strerror or exc}{where}", code="prepare_failed"
        ) from None


def _prepare_workspace(
    repo: RepoLike, job_id: str, settings: Settings, credential: GitCredential | None
) -> Workspace:
    mode = repo.workspace
    if mode not in MODES:
        raise GitError(f"unknown workspace mode {mode!r}", code="prepare_failed")
    if not _JOB_ID.match(job_id):
        raise GitError("job id is not a safe folder name", code="prepare_failed")
    home = real_dir(settings.data_dir) / "git-home" / job_id
    if mode != "scratch":  # no git runs in a scratch workspace: no git HOME to make (or remove)
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        ws = _prepare(repo, job_id, settings, credential, mode, home)
        if repo.source_type != "git_url" and repo.push and ws.store is not None:
            ws.push_url = _local_origin_url(ws)
        # Compared resolved: an in_place repo's path as configured may run through a symlink, and
        # unrecorded, every check of the git dir (`git_dir_problem`) would be off.
        if ws.git_dir is not None and _real(ws.git_dir).parent == _real(ws.path):
            st = os.lstat(ws.git_dir)
            ws.git_dir_id = (st.st_dev, st.st_ino)
        return ws
    except BaseException:
        shutil.rmtree(home, ignore_errors=True)
        raise


def _prepare(
    repo: RepoLike, job_id: str, settings: Settings, credential: GitCredential | None, mode: str, home: Path
) -> Workspace:
    root = real_dir(settings.workspace_dir)
    path = root / job_id
    if mode == "scratch":
        new_folder(root, path)
        return Workspace(path, mode, None, None, None, job_id, home)

    validate_source(repo.source)
    branch = job_branch(job_id)
    validate_ref_name(branch)
    if repo.branch:
        validate_ref_name(repo.branch)
    if repo.source_type == "git_url":
        if mode == "in_place":
            raise GitError(
                "in_place needs a local repo; URL repos use clone or worktree", code="prepare_failed"
            )
        return _prepare_from_mirror(repo, job_id, settings, credential, mode, home, root, path, branch)
    return _prepare_local(repo, job_id, settings, mode, home, root, path, branch)


def _prepare_from_mirror(
    repo: RepoLike,
    job_id: str,
    settings: Settings,
    credential: GitCredential | None,
    mode: str,
    home: Path,
    root: Path,
    path: Path,
    branch: str,
) -> Workspace:
    mirror = mirror_path(repo, settings)
    with repo_lock(settings, repo_lock_key(repo)):
        sync_mirror(repo, mirror, home, credential)
        base_branch = repo.branch or remote_default_branch(repo, home, credential)
        base_commit = resolve(mirror, f"refs/remotes/origin/{base_branch}", home)
    spare = SpareSource(repo_lock_key(repo), mode, mirror, without_user(repo.source), base_commit)
    git_dir = take_spare(settings, spare, path, base_branch, branch, home)
    if git_dir is None and mode == "worktree":
        git_dir = make_worktree(settings, repo_lock_key(repo), mirror, root, path, branch, base_commit, home)
    elif git_dir is None:
        new_folder(root, path)
        try:
            git_dir = shared_clone(
                mirror, path, without_user(repo.source), base_branch, base_commit, branch, home
            )
        except BaseException:
            with contextlib.suppress(GitError):  # the original error says why
                remove_tree(path, root)
            raise
    refill_later(settings, spare)
    # Once the workspace is made: the upkeep takes the repo lock and a core, which the take needs.
    run_in_background(("upkeep", mirror), "mirror_upkeep", lambda: upkeep_mirror(settings, repo, mirror))
    return Workspace(path, mode, branch, base_branch, base_commit, job_id, home, git_dir, mirror)


def _prepare_local(
    repo: RepoLike,
    job_id: str,
    settings: Settings,
    mode: str,
    home: Path,
    root: Path,
    path: Path,
    branch: str,
) -> Workspace:
    source, store, base_branch, base_commit = local_base(repo, home)
    if mode == "in_place":
        with repo_lock(settings, repo_lock_key(repo)):
            return prepare_in_place(repo, job_id, source, store, base_branch, base_commit, branch, home)
    if mode == "worktree":
        spare = SpareSource(repo_lock_key(repo), mode, store, str(source), base_commit)
        git_dir = take_spare(settings, spare, path, base_branch, branch, home) or make_worktree(
            settings, repo_lock_key(repo), store, root, path, branch, base_commit, home
        )
        refill_later(settings, spare)
        return Workspace(path, mode, branch, base_branch, base_commit, job_id, home, git_dir, store)

    spare = SpareSource(repo_lock_key(repo), mode, store, str(source), base_commit, owns_objects=True)
    taken = take_spare(settings, spare, path, base_branch, branch, home)
    refill_later(settings, spare)
    if taken is not None:
        return Workspace(path, mode, branch, base_branch, base_commit, job_id, home, taken, store)
    new_folder(root, path)
    try:
        # A local clone hard-links the objects (copies across file systems): independent of the source.
        run_git(
            ["clone", "-q", "--no-checkout", "--", str(source), str(path)],
            home=home,
            error_code="clone_failed",
        )
        git_dir = path / ".git"
        run_in(git_dir, path, ["checkout", "-q", "-b", branch, base_commit], home, "branch_failed")
    except BaseException:
        with contextlib.suppress(GitError):  # the original error says why
            remove_tree(path, root)
        raise
    return Workspace(path, mode, branch, base_branch, base_commit, job_id, home, git_dir, store)


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _local_origin_url(ws: Workspace) -> str | None:
    assert ws.store is not None
    got = run_git(
        [f"--git-dir={ws.store}", "config", "--get", "remote.origin.url"], home=ws.home, check=False
    )
    url = got.stdout.strip()
    return url if got.returncode == 0 and url else None


# --- cleanup ----------------------------------------------------------------------------------------


_RECORD_FIELDS = ("path", "mode", "branch", "base_branch", "base_commit", "git_dir", "store", "original_ref")


def workspace_record(ws: Workspace) -> dict[str, Any]:
    """What the run manifest keeps of a workspace, so that start-up recovery can clean it up after
    a crash (`workspace_from_record`): paths and refs, no credential."""
    record = {name: getattr(ws, name) for name in _RECORD_FIELDS}
    record["git_dir_id"] = list(ws.git_dir_id) if ws.git_dir_id else None
    return {k: str(v) if isinstance(v, Path) else v for k, v in record.items()}


def workspace_from_record(record: Mapping[str, Any], job_id: str, settings: Settings) -> Workspace:
    """The workspace a crashed run left, from its manifest's record; its git HOME is a fresh one
    (the old one is removed with it)."""
    if record.get("mode") not in MODES:
        raise GitError("the run manifest names no known workspace mode", code="cleanup_failed")

    def path(name: str) -> Path | None:
        value = record.get(name)
        return Path(value) if isinstance(value, str) and value else None

    home = real_dir(settings.data_dir) / "git-home" / job_id
    ws_path = path("path")
    if ws_path is None:
        raise GitError("the run manifest names no workspace path", code="cleanup_failed")
    git_dir_id = record.get("git_dir_id")
    return Workspace(
        path=ws_path,
        mode=str(record["mode"]),
        branch=record.get("branch"),
        base_branch=record.get("base_branch"),
        base_commit=record.get("base_commit"),
        job_id=job_id,
        home=home,
        git_dir=path("git_dir"),
        store=path("store"),
        original_ref=record.get("original_ref"),
        git_dir_id=(int(git_dir_id[0]), int(git_dir_id[1])) if isinstance(git_dir_id, list) else None,
    )


def cleanup_workspace(
    ws: Workspace, repo: RepoLike, settings: Settings, *, failed: bool, recovering: bool = False
) -> None:
    """Removes the workspace when `RUNNER_CLEANUP_AFTER_JOB` (kept for a failed job with
    `RUNNER_KEEP_FAILED_WORKSPACES`). A job branch with commits is kept in the repo it came from;
    one without is deleted. The job's git HOME always goes.

    `recovering`: the cleanup of a run that crashed, lost its lease or was failed by a watchdog
    (`recovery.clean_up_ended_job`): an in_place repo is put back only while it is still on this
    job's branch, since another job (or the operator) may have the folder by now."""
    try:
        if not _keeps_workspace(settings, failed=failed):
            root = real_dir(settings.workspace_dir)
            if ws.mode == "scratch":
                remove_tree(ws.path, root)
            elif ws.mode == "worktree":
                cleanup_worktree(ws, repo, settings, root)
            elif ws.mode == "clone":
                cleanup_clone(ws, repo, settings, root)
            elif ws.mode == "in_place":
                cleanup_in_place(ws, repo, settings, recovering=recovering)
    finally:
        shutil.rmtree(ws.home, ignore_errors=True)


def _keeps_workspace(settings: Settings, *, failed: bool) -> bool:
    """`RUNNER_CLEANUP_AFTER_JOB` off, or a failed job's with `RUNNER_KEEP_FAILED_WORKSPACES`."""
    return not settings.cleanup_after_job or (failed and settings.keep_failed_workspaces)


def remove_empty_scratch(ws: Workspace, settings: Settings, *, failed: bool) -> bool:
    """The whole cleanup of a `scratch` workspace the script left empty (the usual trivial job): one
    `rmdir`, cheap enough to run on the event loop. False when it is not that case (another mode, a
    folder with files, a symlink in its place): `cleanup_workspace` then does the work."""
    if ws.mode != "scratch":
        return False
    if _keeps_workspace(settings, failed=failed):
        return True  # kept; a scratch workspace has no git HOME to remove
    if ws.path.parent != real_dir(settings.workspace_dir):
        return False  # cleanup_workspace refuses it, with the reason
    try:
        os.rmdir(ws.path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def cleanup_unrecorded(repo: RepoLike, job_id: str, mode: str, settings: Settings) -> bool:
    """What a prepare that never finished may have left, found by the names the runner gives
    (`<workspace dir>/<job id>`, `runner/<id8>`): the run crashed, or was failed by a watchdog,
    before its manifest recorded the workspace (`workspace_record`), or ran with another data
    folder. An in_place repo still on that branch goes back to the branch checked out before it
    (`@{-1}`), what was left uncommitted kept in a stash entry; a branch is deleted only if it has
    no commits of its own. True if something was found."""
    if _keeps_workspace(settings, failed=True) or mode == "scratch" or not _JOB_ID.match(job_id):
        return False
    home = real_dir(settings.data_dir) / "git-home" / job_id
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    branch = job_branch(job_id)
    try:
        if mode == "in_place":
            return repo.source_type != "git_url" and unrecorded_in_place(repo, job_id, branch, settings, home)
        root = real_dir(settings.workspace_dir)
        path = root / job_id
        found = path.exists() or path.is_symlink()
        store = _unrecorded_store(repo, settings, home) if mode == "worktree" else None
        with repo_lock(settings, repo_lock_key(repo)):
            if store is not None:
                remove = ["worktree", "remove", "--force", "--force", "--", str(path)]
                run_git([f"--git-dir={store}", *remove], home=home, check=False)
            if path.exists() or path.is_symlink():
                remove_tree(path, root)
            if store is not None:
                run_git([f"--git-dir={store}", "worktree", "prune"], home=home, check=False)
                found |= delete_branch_without_commits(store, branch, home)
        return found
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _unrecorded_store(repo: RepoLike, settings: Settings, home: Path) -> Path | None:
    if repo.source_type == "git_url":
        mirror = mirror_path(repo, settings)
        return mirror if mirror.is_dir() else None
    source = Path(repo.source)
    if not source.is_dir():
        return None
    return local_git_dir(source, home, "cleanup_failed")
