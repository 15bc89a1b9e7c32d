"""What the workspace modules share (`workspace` is their entry point): the `Workspace` record and
the `RepoLike` it is made from, the folders and git dirs of local repos, the check of a workspace's
pinned git dir, and the deletion of job branches and workspace folders."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR
from typing import Any, Protocol

import structlog

from codex_runner.config import Settings
from codex_runner.execution.git import GitError, run_git
from codex_runner.execution.gitutil import current_branch, git_out, lock_key, real_dir, resolve, try_resolve

log = structlog.get_logger("codex_runner.workspace")
# Background tasks with a git HOME of their own, `git-home/<kind>-<12 hex>` (retention knows them).
TASK_HOME_KINDS = ("prewarm", "upkeep")


class RepoLike(Protocol):
    """The part of `catalog.RepoSpec` the workspace modules read."""

    @property
    def source(self) -> str: ...
    @property
    def source_type(self) -> str: ...  # "local_path" | "git_url"
    @property
    def branch(self) -> str | None: ...
    @property
    def workspace(self) -> str: ...
    @property
    def push(self) -> bool: ...


@dataclass
class Workspace:
    path: Path
    mode: str
    branch: str | None
    base_branch: str | None
    base_commit: str | None
    job_id: str
    home: Path  # the job's HOME for git; never the agent's
    # Pinned before the agent runs: every later command names it, so a rewritten `.git` file or folder
    # cannot send the runner's commit or push into another repository.
    git_dir: Path | None = None
    store: Path | None = None  # git dir of the repository the workspace came from (local repo or mirror)
    original_ref: str | None = None  # in_place: the branch (or commit) to return to at cleanup
    # A local repo's `remote.origin.url`, read before the agent runs: in worktree and in_place mode
    # the agent can write that config, and must not choose where the job's branch is pushed.
    push_url: str | None = None
    # (st_dev, st_ino) of `git_dir` when it lies in the workspace (clone, in_place): the agent can
    # replace that folder (a gitfile or a symlink naming another repository, a `commondir` file),
    # and a pinned path alone would then follow it. See `git_dir_problem`.
    git_dir_id: tuple[int, int] | None = None


@dataclass(frozen=True)
class CommitResult:
    commit: str | None
    files_changed: int
    lines_added: int
    lines_removed: int


NO_CHANGES = CommitResult(None, 0, 0, 0)


# --- folders and repos ------------------------------------------------------------------------------


def new_folder(root: Path, path: Path) -> None:
    if path.parent != root:
        raise GitError("workspace path escapes RUNNER_WORKSPACE_DIR", code="prepare_failed")
    root.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        raise GitError(f"workspace {path} already exists", code="prepare_failed") from None


def repo_lock_key(repo: RepoLike) -> str:
    return lock_key(repo.source)


def local_base(repo: RepoLike, home: Path) -> tuple[Path, Path, str, str]:
    """A local repo's folder, git dir, base branch and base commit."""
    source = Path(repo.source)
    if not source.is_dir():
        raise GitError(f"local repo {source} does not exist", code="clone_failed")
    store = local_git_dir(source, home, "clone_failed")
    base_branch = repo.branch or current_branch(store, home)
    return source, store, base_branch, resolve(store, f"refs/heads/{base_branch}", home)


def local_git_dir(source: Path, home: Path, code: str) -> Path:
    """The git dir of a local repo's folder (its `.git`, or the folder of a bare repo), absolute."""
    return Path(git_out([f"--git-dir={_dot_git(source)}", "rev-parse", "--absolute-git-dir"], home, code))


def _dot_git(source: Path) -> Path:
    dot = source / ".git"
    return dot if dot.exists() else source  # a bare repository is its own git dir


@contextmanager
def task_home(settings: Settings, kind: str) -> Iterator[Path]:
    """A fresh git HOME for a background task (`TASK_HOME_KINDS`), removed when it ends; retention
    removes one a crash left behind."""
    assert kind in TASK_HOME_KINDS
    home = real_dir(settings.data_dir) / "git-home" / f"{kind}-{uuid.uuid4().hex[:12]}"
    home.mkdir(mode=0o700, parents=True)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def first_few(paths: Sequence[str]) -> str:
    """The first five paths, for an error line that names what it refuses."""
    return ", ".join(paths[:5]) + (" …" if len(paths) > 5 else "")


# --- the pinned git dir -----------------------------------------------------------------------------


# Inside a git dir, what git writes through when it commits: a symlink at any of these would carry
# the runner's objects, refs or index into another repository, or its commit message
# (COMMIT_EDITMSG, opened for writing) and reflog lines (appended) into any file the runner can
# write. Also every folder in `objects` and the job branch's reflog (`git_dir_problem`).
_GIT_DIR_WRITE_PATHS = (
    "objects",
    "refs",
    "refs/heads",
    "refs/heads/runner",
    "logs",
    "logs/HEAD",
    "logs/refs",
    "logs/refs/heads",
    "logs/refs/heads/runner",
    "HEAD",
    "index",
    "COMMIT_EDITMSG",
)


_LOOSE_DIR = re.compile(r"[0-9a-f]{2}")


def git_dir_problem(ws: Workspace) -> str | None:
    """Why the workspace's git dir is no longer the one prepared, or None. Only for a git dir in
    the workspace (`git_dir_id`): the agent may rewrite everything in there, but what it points the
    runner's own git at must stay that repository."""
    if ws.git_dir_id is None or ws.git_dir is None:
        return None
    try:
        st = os.lstat(ws.git_dir)
    except OSError:
        return "the workspace's .git folder is gone"
    if not S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) != ws.git_dir_id:
        return "the workspace's .git folder was replaced"
    if os.path.lexists(ws.git_dir / "commondir"):
        return "the workspace's .git names another repository (commondir)"
    names = [*_GIT_DIR_WRITE_PATHS, *([f"logs/refs/heads/{ws.branch}"] if ws.branch else [])]
    for name in names:
        if os.path.islink(ws.git_dir / name):
            return f"the workspace's .git/{name} is a symbolic link"
    try:
        with os.scandir(ws.git_dir / "objects") as entries:  # loose objects go into objects/<xx>/
            for entry in entries:
                # The folders loose objects are written into; `pack` or `info` moved to another
                # disk by a symlink is an operator's layout (an in_place repo's own).
                if _LOOSE_DIR.fullmatch(entry.name) and entry.is_symlink():
                    return f"the workspace's .git/objects/{entry.name} is a symbolic link"
    except OSError:
        pass  # no objects folder: git fails on its own
    return None


def check_git_dir(ws: Workspace, code: str) -> None:
    problem = git_dir_problem(ws)
    if problem:
        raise GitError(
            f"{problem}: the runner commits and pushes only in the repository it prepared", code=code
        )


# --- cleanup ----------------------------------------------------------------------------------------


def delete_branch_without_commits(git_dir: Path, branch: str, home: Path) -> bool:
    """Deletes `branch` when every commit on it is on another branch, a tag or a remote-tracking ref
    too (a branch made at its base and never committed to): where the base is not recorded. A
    branch with commits of its own stays. True if there was such a branch."""
    ref = f"refs/heads/{branch}"
    if try_resolve(git_dir, ref, home) is None:
        return False
    own = run_git(
        [
            f"--git-dir={git_dir}",
            "rev-list",
            "-1",
            ref,
            "--not",
            f"--exclude={branch}",  # before `--branches`: the name without `refs/heads/` (git-rev-list(1))
            "--branches",
            "--tags",
            "--remotes",
        ],
        home=home,
        check=False,
    )
    if own.returncode == 0 and not own.stdout.strip():
        run_git([f"--git-dir={git_dir}", "update-ref", "-d", ref], home=home, check=False)
    else:
        log.warning("job_branch_kept", branch=branch, reason="it has commits of its own")
    return True


def delete_branch_if_unchanged(git_dir: Path, branch: str, base_commit: str, home: Path) -> None:
    # update-ref with the expected old value: deletes only a branch still at the base (no commits).
    run_git(
        [f"--git-dir={git_dir}", "update-ref", "-d", f"refs/heads/{branch}", base_commit],
        home=home,
        check=False,
    )


def remove_tree(path: Path, root: Path) -> None:
    """Deletes a workspace folder, and nothing outside RUNNER_WORKSPACE_DIR: a workspace the agent
    replaced by a symlink loses the link only (rmtree itself never follows links). A folder the
    agent made unwritable or unreadable (`chmod 000`) is opened up and deleted; what still cannot
    be deleted (an immutable file, a mount) raises `cleanup_failed`, naming it: the folder was
    kept while the cleanup said success."""
    if path.parent != root:
        raise GitError(f"refusing to delete {path}: not a workspace folder", code="cleanup_failed")
    if path.is_symlink():
        path.unlink()
        return
    if not path.exists():
        return
    try:
        delete_tree(path)
    except OSError as exc:
        raise GitError(
            f"cannot delete the workspace folder {path}: {exc.strerror}", code="cleanup_failed"
        ) from None


def delete_tree(path: Path) -> None:
    """`shutil.rmtree` of a folder whose every file the runner's user owns (a workspace), opening
    up what a job locked (`chmod 000`) on the way. Raises OSError naming the first entry that
    could not go (an immutable file, a mount)."""
    shutil.rmtree(path, onerror=functools.partial(_open_up_and_retry, set()))
    if os.path.lexists(path):
        raise OSError(errno.ENOTEMPTY, f"{_first_left(path)} is left", str(path))


def _open_up_and_retry(
    opened: set[str], function: Callable[..., object], failed: str, info: tuple[Any, ...]
) -> None:
    """rmtree's error handler: a permission refused in a folder the job owns is lifted (the
    runner's user owns every file of a workspace) and the step tried once more, with the same
    handler for what that folder holds (a locked folder inside a locked folder; root never saw
    one, CAP_DAC_OVERRIDE opens them all). Once per path (`opened`): a chmod that changes nothing
    (an immutable folder) must not loop. Any other error leaves the entry, which `remove_tree`
    then reports."""
    if not isinstance(info[1], PermissionError) or failed in opened:
        return
    opened.add(failed)
    with contextlib.suppress(OSError):
        parent = os.path.dirname(failed)
        os.chmod(parent, 0o700)
        if os.path.isdir(failed) and not os.path.islink(failed):
            os.chmod(failed, 0o700)
            shutil.rmtree(failed, onerror=functools.partial(_open_up_and_retry, opened))
        else:
            function(failed)


def _first_left(path: Path) -> str:
    """The first file (else folder) still in `path`, relative to it."""
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in (*filenames, *dirnames):
            return os.path.relpath(os.path.join(dirpath, name), path)
    return "the folder itself"
