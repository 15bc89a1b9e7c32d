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
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import structlog

from codex_runner.config import Settings
from codex_runner.execution.git import (
    LOCK_RETRY_SECONDS,
    NETWORK_TIMEOUT,
    GitCredential,
    GitError,
    GitResult,
    is_plain_http,
    run_git,
    url_host,
    validate_ref_name,
    validate_source,
    without_user,
)
from codex_runner.execution.gitutil import current_branch as _current_branch
from codex_runner.execution.gitutil import (
    filter_guard,
    head_ref,
    lock_key,
    nested_guard,
    rebased_or_head_ref,
    remove_stale_locks,
)
from codex_runner.execution.gitutil import git_out as _git_out
from codex_runner.execution.gitutil import real_dir as _real_dir
from codex_runner.execution.gitutil import repo_lock as _repo_lock
from codex_runner.execution.gitutil import resolve as _resolve
from codex_runner.execution.gitutil import run_in as _run_in
from codex_runner.execution.gitutil import try_resolve as _try_resolve
from codex_runner.execution.spares import SpareSource, refill_later, run_in_background, take_spare
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

log = structlog.get_logger("codex_runner.workspace")

MODES = ("worktree", "clone", "in_place", "scratch")
# Background tasks with a git HOME of their own, `git-home/<kind>-<12 hex>` (retention knows them).
TASK_HOME_KINDS = ("prewarm", "upkeep")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Remote branches live under refs/remotes/origin in the mirror, so `fetch --prune` never touches the
# job branches (refs/heads/runner/*) that worktrees of the mirror have checked out or that cleanup kept.
_MIRROR_REFSPECS = ("+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*")
# Rewritten before every fetch: a worktree of the mirror shares this file with the agent, and the fetch
# is the one command that carries a credential.
_MIRROR_CONFIG = "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = true\n"


class RepoLike(Protocol):
    """The part of `catalog.RepoSpec` this module reads."""

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
    # and a pinned path alone would then follow it. See `_git_dir_problem`.
    git_dir_id: tuple[int, int] | None = None


@dataclass(frozen=True)
class CommitResult:
    commit: str | None
    files_changed: int
    lines_added: int
    lines_removed: int


NO_CHANGES = CommitResult(None, 0, 0, 0)


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
    home = _real_dir(settings.data_dir) / "git-home" / job_id
    if mode != "scratch":  # no git runs in a scratch workspace: no git HOME to make (or remove)
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        ws = _prepare(repo, job_id, settings, credential, mode, home)
        if repo.source_type != "git_url" and repo.push and ws.store is not None:
            ws.push_url = _local_origin_url(ws)
        # Compared resolved: an in_place repo's path as configured may run through a symlink, and
        # unrecorded, every check of the git dir (`_git_dir_problem`) would be off.
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
    root = _real_dir(settings.workspace_dir)
    path = root / job_id
    if mode == "scratch":
        _new_folder(root, path)
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


def _new_folder(root: Path, path: Path) -> None:
    if path.parent != root:
        raise GitError("workspace path escapes RUNNER_WORKSPACE_DIR", code="prepare_failed")
    root.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        raise GitError(f"workspace {path} already exists", code="prepare_failed") from None


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
    mirror = _mirror_path(repo, settings)
    with _repo_lock(settings, _lock_key(repo)):
        _sync_mirror(repo, mirror, home, credential)
        base_branch = repo.branch or _remote_default_branch(repo, home, credential)
        base_commit = _resolve(mirror, f"refs/remotes/origin/{base_branch}", home)
    spare = SpareSource(_lock_key(repo), mode, mirror, without_user(repo.source), base_commit)
    git_dir = take_spare(settings, spare, path, base_branch, branch, home)
    if git_dir is None and mode == "worktree":
        git_dir = _make_worktree(settings, _lock_key(repo), mirror, root, path, branch, base_commit, home)
    elif git_dir is None:
        _new_folder(root, path)
        try:
            git_dir = _shared_clone(
                mirror, path, without_user(repo.source), base_branch, base_commit, branch, home
            )
        except BaseException:
            with contextlib.suppress(GitError):  # the original error says why
                _remove_tree(path, root)
            raise
    refill_later(settings, spare)
    # Once the workspace is made: the upkeep takes the repo lock and a core, which the take needs.
    run_in_background(("upkeep", mirror), "mirror_upkeep", lambda: _upkeep_mirror(settings, repo, mirror))
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
    source, store, base_branch, base_commit = _local_base(repo, home)
    if mode == "in_place":
        with _repo_lock(settings, _lock_key(repo)):
            return _prepare_in_place(repo, job_id, source, store, base_branch, base_commit, branch, home)
    if mode == "worktree":
        spare = SpareSource(_lock_key(repo), mode, store, str(source), base_commit)
        git_dir = take_spare(settings, spare, path, base_branch, branch, home) or _make_worktree(
            settings, _lock_key(repo), store, root, path, branch, base_commit, home
        )
        refill_later(settings, spare)
        return Workspace(path, mode, branch, base_branch, base_commit, job_id, home, git_dir, store)

    spare = SpareSource(_lock_key(repo), mode, store, str(source), base_commit, owns_objects=True)
    taken = take_spare(settings, spare, path, base_branch, branch, home)
    refill_later(settings, spare)
    if taken is not None:
        return Workspace(path, mode, branch, base_branch, base_commit, job_id, home, taken, store)
    _new_folder(root, path)
    try:
        # A local clone hard-links the objects (copies across file systems): independent of the source.
        run_git(
            ["clone", "-q", "--no-checkout", "--", str(source), str(path)],
            home=home,
            error_code="clone_failed",
        )
        git_dir = path / ".git"
        _run_in(git_dir, path, ["checkout", "-q", "-b", branch, base_commit], home, "branch_failed")
    except BaseException:
        with contextlib.suppress(GitError):  # the original error says why
            _remove_tree(path, root)
        raise
    return Workspace(path, mode, branch, base_branch, base_commit, job_id, home, git_dir, store)


def _local_base(repo: RepoLike, home: Path) -> tuple[Path, Path, str, str]:
    """A local repo's folder, git dir, base branch and base commit."""
    source = Path(repo.source)
    if not source.is_dir():
        raise GitError(f"local repo {source} does not exist", code="clone_failed")
    store = _local_git_dir(source, home, "clone_failed")
    base_branch = repo.branch or _current_branch(store, home)
    return source, store, base_branch, _resolve(store, f"refs/heads/{base_branch}", home)


def _local_git_dir(source: Path, home: Path, code: str) -> Path:
    """The git dir of a local repo's folder (its `.git`, or the folder of a bare repo), absolute."""
    return Path(_git_out([f"--git-dir={_dot_git(source)}", "rev-parse", "--absolute-git-dir"], home, code))


def _prepare_in_place(
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
    status = _run_in(
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
    original = head.stdout.strip() if head.returncode == 0 else _resolve(store, "HEAD", home)
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
    same_tree = _try_resolve(store, "HEAD", home) == base_commit
    # Ignored files are the operator's (local settings, build output): a checkout overwrites one
    # the base tracks, and the switch back at cleanup would then delete it. Refused instead.
    _run_in(
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
    listed = _run_in(store, source, ["ls-files", "-v", "-z"], home, "prepare_failed", guard=guard).stdout
    # `ls-files -v` tags an entry with a lower-case letter when it is marked assume-unchanged.
    marked = [entry[2:] for entry in listed.split("\0") if entry[:1].islower()]
    if marked:
        raise GitError(
            f"in_place repo: {_first_few(marked)} marked --assume-unchanged: git hides their changes, and the job's "
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
    shown = _run_in(store, source, status, home, "prepare_failed", guard=guard).stdout
    paths = [entry[3:] for entry in shown.split("\0") if len(entry) > 3]
    if not paths:
        return
    _run_in(store, source, _checkout_back(original, force=False), home, "prepare_failed", guard=guard)
    _delete_branch_if_unchanged(store, branch, base_commit, home)
    names = _first_few(paths)
    where = original.removeprefix("refs/heads/")
    raise GitError(
        f"in_place repo: {names} ignored on {where} but not on the repo's branch {base_branch}: the "
        "job's commit would take them in (and the push publish them); ignore them there too "
        "(.gitignore, or .git/info/exclude) or move them away",
        code="prepare_failed",
    )


def _make_worktree(
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
    _new_folder(root, path)
    try:
        with _repo_lock(settings, key):
            path.rmdir()  # `worktree add` creates it; the folder only proved the name was free
            add = ["worktree", "add", "-q", "--no-checkout", "-b", branch, "--", str(path), base_commit]
            run_git([f"--git-dir={store}", *add], home=home, error_code="branch_failed")
        git_dir = Path(_git_out(["-C", str(path), "rev-parse", "--absolute-git-dir"], home, "branch_failed"))
        # The checkout of many files runs outside the lock, in parallel with other jobs' checkouts.
        # The store's config is shared with earlier jobs' agents (`filter_guard`).
        _run_in(
            git_dir, path, ["reset", "--hard", "-q"], home, "branch_failed", guard=filter_guard(git_dir, home)
        )
        return git_dir
    except BaseException:
        with contextlib.suppress(GitError):  # the original error says why
            _remove_tree(path, root)
        with _repo_lock(settings, key):
            run_git([f"--git-dir={store}", "worktree", "prune"], home=home, check=False)
            _delete_branch_if_unchanged(store, branch, base_commit, home)
        raise


def _shared_clone(
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
    _run_in(git_dir, path, ["checkout", "-q", "-b", branch, base_commit], home, "branch_failed")
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
    with _task_home(settings, "prewarm") as home:
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
    key = _lock_key(repo)
    if repo.source_type == "git_url" and repo.workspace in ("clone", "worktree"):
        mirror = _mirror_path(repo, settings)
        if not repo.branch or not mirror.is_dir():
            return None
        commit = _resolve(mirror, f"refs/remotes/origin/{repo.branch}", home)
        return SpareSource(key, repo.workspace, mirror, without_user(repo.source), commit)
    if repo.source_type == "local_path" and repo.workspace in ("clone", "worktree"):
        source, store, _, commit = _local_base(repo, home)
        return SpareSource(key, repo.workspace, store, str(source), commit, repo.workspace == "clone")
    return None


# --- mirror cache -----------------------------------------------------------------------------------


def _mirror_path(repo: RepoLike, settings: Settings) -> Path:
    return _real_dir(settings.mirrors_dir) / f"{_lock_key(repo)}.git"


def _lock_key(repo: RepoLike) -> str:
    return lock_key(repo.source)


def _sync_mirror(repo: RepoLike, mirror: Path, home: Path, credential: GitCredential | None) -> None:
    """Creates the mirror on first use (in a temporary folder renamed into place, so an interrupted
    first clone never looks complete), then fetches. Caller holds the repo lock."""
    if mirror.exists():
        _write_mirror_config(mirror)
        _fetch_mirror(repo, mirror, home, credential)
        return
    mirror.parent.mkdir(parents=True, exist_ok=True)
    for stale in mirror.parent.glob(f".{mirror.name}.*.tmp"):  # a first clone interrupted by a crash
        shutil.rmtree(stale, ignore_errors=True)
    tmp = mirror.parent / f".{mirror.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        run_git(["init", "-q", "--bare", "--", str(tmp)], home=home, error_code="clone_failed")
        _write_mirror_config(tmp)
        _fetch_mirror(repo, tmp, home, credential)
        tmp.rename(mirror)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_mirror_config(git_dir: Path) -> None:
    tmp = git_dir / "config.runner-tmp"
    tmp.write_text(_MIRROR_CONFIG)
    tmp.replace(git_dir / "config")


def _fetch_mirror(repo: RepoLike, mirror: Path, home: Path, credential: GitCredential | None) -> None:
    # The URL is named on the command line, never stored: the mirror's config has no remote at all.
    _remote_git(
        [
            f"--git-dir={mirror}",
            "fetch",
            "-q",
            "--prune",
            "--no-tags",
            "--no-write-fetch-head",
            "--no-auto-maintenance",  # done after the prepare, in the background: `_upkeep_mirror`
            "--no-show-forced-updates",  # the refspecs force every update; nobody reads the report
            "--",
            repo.source,
            *_MIRROR_REFSPECS,
        ],
        repo.source,
        credential,
        home,
        "clone_failed",
    )


def _upkeep_mirror(settings: Settings, repo: RepoLike, mirror: Path) -> None:
    """`git maintenance run --auto` of a mirror, in the background after a job's fetch, which skips it:
    once enough packs pile up (one per fetch that brings more than 100 objects) it repacks the
    mirror, which takes seconds on a big repo and would otherwise happen inside one job's prepare.
    Under the repo lock, like every other write to the mirror."""
    with _task_home(settings, "upkeep") as home, _repo_lock(settings, _lock_key(repo)):
        if mirror.exists():  # retention may have deleted it since
            run_git([f"--git-dir={mirror}", "maintenance", "run", "--auto", "--quiet"], home=home)


@contextmanager
def _task_home(settings: Settings, kind: str) -> Iterator[Path]:
    """A fresh git HOME for a background task (`TASK_HOME_KINDS`), removed when it ends; retention
    removes one a crash left behind."""
    assert kind in TASK_HOME_KINDS
    home = _real_dir(settings.data_dir) / "git-home" / f"{kind}-{uuid.uuid4().hex[:12]}"
    home.mkdir(mode=0o700, parents=True)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _remote_default_branch(repo: RepoLike, home: Path, credential: GitCredential | None) -> str:
    out = _remote_git(
        ["ls-remote", "--symref", "--", repo.source, "HEAD"], repo.source, credential, home, "clone_failed"
    ).stdout
    for line in out.splitlines():
        if line.startswith("ref: refs/heads/") and line.endswith("\tHEAD"):
            name = line[len("ref: refs/heads/") : -len("\tHEAD")]
            validate_ref_name(name)
            return name
    raise GitError("the remote names no default branch; set `branch` for this repo", code="branch_failed")


def _remote_git(
    args: list[str], url: str, credential: GitCredential | None, home: Path, code: str
) -> GitResult:
    """A command that talks to `url` (one of `args`): the credential only over http(s) (ssh uses
    the service account's keys), plain http only where `validate_source` allowed it (loopback), and
    the URL without an http(s) user name (`without_user`)."""
    return run_git(
        [without_user(arg) if arg == url else arg for arg in args],
        home=home,
        credential=credential if url_host(url) else None,
        plain_http=is_plain_http(url),
        error_code=code,
        timeout=NETWORK_TIMEOUT,
    )


# --- commit and push --------------------------------------------------------------------------------


def commit_changes(ws: Workspace, *, message: str, author_name: str, author_email: str) -> CommitResult:
    """Commits everything the script changed (`git add -A`, .gitignore respected) on the job branch and
    counts it against the base commit. Nothing changed: commit None and zeros."""
    if ws.git_dir is None or ws.branch is None or ws.base_commit is None:
        return NO_CHANGES
    _check_git_dir(ws, "commit_failed")
    ref = f"refs/heads/{ws.branch}"
    # The agent may have switched or deleted branches: the job's commit still goes on the job branch.
    head = _run_in(ws.git_dir, ws.path, ["symbolic-ref", "-q", "HEAD"], ws.home, "commit_failed", check=False)
    if head.stdout.strip() != ref:
        if _try_resolve(ws.git_dir, ref, ws.home) is None:
            _run_in(ws.git_dir, ws.path, ["update-ref", ref, ws.base_commit], ws.home, "commit_failed")
        _run_in(ws.git_dir, ws.path, ["symbolic-ref", "HEAD", ref], ws.home, "commit_failed")
    # The agent could write this config. Read once HEAD is where `add` finds it: an
    # `includeIf "onbranch:..."` it added applies only on the branch HEAD names at that moment.
    guard = filter_guard(ws.git_dir, ws.home)
    # And the config of every repository the index links to (`nested_guard`): before `add`, which
    # looks inside the ones already linked, and after it, for `commit`, which looks inside all.
    seen: dict[Path, tuple[tuple[str, str], ...]] = {}
    guard = nested_guard(ws.git_dir, ws.path, ws.home, "commit_failed", guard, seen=seen)
    _run_in(ws.git_dir, ws.path, ["add", "-A"], ws.home, "commit_failed", guard=guard)
    guard = nested_guard(ws.git_dir, ws.path, ws.home, "commit_failed", guard, seen=seen)
    # Links to repositories of the agent's own, staged now or committed by the agent itself.
    _refuse_stray_gitlinks(ws, guard)
    staged = _run_in(
        ws.git_dir,
        ws.path,
        ["diff", "--cached", "--quiet", "--no-ext-diff", "--no-textconv"],
        ws.home,
        "commit_failed",
        check=False,
        guard=guard,
    )
    if staged.returncode not in (0, 1):
        raise GitError(f"git diff --cached failed: {staged.stderr.strip()}", code="commit_failed")
    if staged.returncode == 1:
        ident = {
            "GIT_AUTHOR_NAME": author_name,
            "GIT_AUTHOR_EMAIL": author_email,
            "GIT_COMMITTER_NAME": author_name,
            "GIT_COMMITTER_EMAIL": author_email,
        }
        _commit_index(ws, ref, message, ident, guard)
    tip = _resolve(ws.git_dir, ref, ws.home, code="commit_failed")
    if tip == ws.base_commit:
        return NO_CHANGES
    return _numstat(ws, tip)


def _commit_index(
    ws: Workspace, ref: str, message: str, ident: dict[str, str], guard: Sequence[tuple[str, str]]
) -> None:
    """Commits the index on `ref` with plumbing (`write-tree`, `commit-tree`, `update-ref`), not
    `git commit`: that writes the message into `.git/COMMIT_EDITMSG`, opened for writing through
    whatever link is there, and a process of the agent's that outlived its job (one that made an
    environment of its own is not found by `RUNNER_JOB_ID`) could make it a link after
    `_check_git_dir`: the runner then wrote over any file it can write. No hook or editor either,
    and no merge or cherry-pick the agent left in progress is taken over: one parent, our author."""
    assert ws.git_dir is not None
    tree = _run_in(ws.git_dir, ws.path, ["write-tree"], ws.home, "commit_failed", guard=guard).stdout.strip()
    parent = _resolve(ws.git_dir, ref, ws.home, code="commit_failed")
    commit = _run_in(
        ws.git_dir,
        ws.path,
        ["commit-tree", tree, "-p", parent, "-F", "-"],
        ws.home,
        "commit_failed",
        env_extra=ident,
        input_text=message,
    ).stdout.strip()
    # As `git commit` words its reflog entry; the old value makes a concurrent move of the ref fail.
    subject = message.split("\n", 1)[0]
    update = ["update-ref", "-m", f"commit: {subject}", ref, commit, parent]
    _run_in(ws.git_dir, ws.path, update, ws.home, "commit_failed")


def _refuse_stray_gitlinks(ws: Workspace, guard: tuple[tuple[str, str], ...]) -> None:
    """A folder the agent made a repository of its own (`git init`, as scaffolding tools do) is
    staged by `add -A` as a link to its commit, not as its files: the commit would name a commit
    that is never pushed, and the files would go with the workspace. Refused unless `.gitmodules`
    lists it (a submodule the agent added on purpose)."""
    assert ws.git_dir is not None and ws.base_commit is not None
    # From the base commit to the index: what `add -A` staged and what the agent committed itself.
    raw = _run_in(
        ws.git_dir,
        ws.path,
        ["diff-index", "--cached", "--raw", "-z", "--no-renames", ws.base_commit, "--"],
        ws.home,
        "commit_failed",
        guard=guard,
    ).stdout
    fields = raw.split("\0")
    links = [
        path
        for meta, path in zip(fields[::2], fields[1::2], strict=False)
        if meta.startswith(":") and meta.split(" ")[1:2] == ["160000"] and meta.split(" ")[0] != ":160000"
    ]
    if not links:
        return
    listed = _run_in(
        ws.git_dir,
        ws.path,
        ["config", "--file", str(ws.path / ".gitmodules"), "--get-regexp", r"^submodule\..*\.path$"],
        ws.home,
        "commit_failed",
        check=False,
    ).stdout
    submodules = {line.split(" ", 1)[1] for line in listed.splitlines() if " " in line}
    stray = [path for path in links if path not in submodules]
    if stray:
        raise GitError(
            f"{_first_few(stray)}: a git repository of its own inside the workspace (a `git init` there?); its files "
            "cannot be committed, only a link to a commit that is never pushed. Remove its .git folder, "
            "or add it as a submodule (.gitmodules)",
            code="commit_failed",
        )


def _first_few(paths: Sequence[str]) -> str:
    """The first five paths, for an error line that names what it refuses."""
    return ", ".join(paths[:5]) + (" …" if len(paths) > 5 else "")


def _numstat(ws: Workspace, tip: str) -> CommitResult:
    assert ws.git_dir is not None and ws.base_commit is not None
    # Plumbing, so no external diff or textconv program configured in the workspace runs.
    out = _run_in(
        ws.git_dir,
        ws.path,
        ["diff-tree", "-r", "-z", "-M", "--numstat", ws.base_commit, tip],
        ws.home,
        "commit_failed",
    ).stdout
    files = added = removed = 0
    fields = iter(out.split("\0"))
    for entry in fields:
        if not entry:
            continue
        counts = entry.split("\t")
        if len(counts) < 3:
            continue
        files += 1
        if counts[2] == "":  # a rename: the old and the new path follow as their own fields
            next(fields, None)
            next(fields, None)
        if counts[0] != "-":  # binary files show "-\t-": counted as a file, with no lines
            added += int(counts[0])
            removed += int(counts[1])
    return CommitResult(tip, files, added, removed)


def push_branch(ws: Workspace, repo: RepoLike, credential: GitCredential | None) -> None:
    """Pushes the job branch to the repo's origin (the URL, or a local repo's `remote.origin.url`).

    The push runs from a fresh bare repository in the job's git HOME that borrows the workspace's
    objects, so no configuration the agent could have written (proxies, url rewrites, TLS settings)
    applies to the one command that carries the credential."""
    if ws.git_dir is None or ws.branch is None:
        raise GitError("a scratch workspace has no branch to push", code="push_failed")
    url = repo.source if repo.source_type == "git_url" else ws.push_url
    if url is None:
        raise GitError("the local repo has no origin remote to push to", code="push_failed")
    validate_source(url)
    _check_git_dir(ws, "push_failed")
    tip = _resolve(ws.git_dir, f"refs/heads/{ws.branch}", ws.home, code="push_failed")
    objects = Path(
        _git_out([f"--git-dir={ws.git_dir}", "rev-parse", "--git-path", "objects"], ws.home, "push_failed")
    )
    if not objects.is_absolute():
        objects = ws.git_dir / objects
    shim = ws.home / f"push-{uuid.uuid4().hex[:8]}.git"
    ref = f"refs/heads/{ws.branch}"
    try:
        run_git(["init", "-q", "--bare", "--", str(shim)], home=ws.home, error_code="push_failed")
        (shim / "objects" / "info" / "alternates").write_text(f"{objects.resolve()}\n")
        target = _local_target(url)
        if target is not None:
            _fetch_into_local(target, shim, ref, tip, ws.home)
            return
        _remote_git(
            [f"--git-dir={shim}", "push", "-q", "--", url, f"{tip}:{ref}"],
            url,
            credential,
            ws.home,
            "push_failed",
        )
    finally:
        shutil.rmtree(shim, ignore_errors=True)


def _local_target(url: str) -> Path | None:
    """The folder a local push target names (an absolute path or a file:// URL), else None."""
    if url.startswith("/"):
        return Path(url)
    if url.lower().startswith("file:"):
        return Path(unquote(urlsplit(url).path))
    return None


def _fetch_into_local(target: Path, shim: Path, ref: str, tip: str, home: Path) -> None:
    """The push to a repo on this machine, done from its side: `git push` to a local path starts
    the receiving repo's `receive-pack`, which runs that repo's hooks as the runner, and git clears
    our config overrides (`core.hooksPath`) for it. The target is whatever origin the local repo
    names, which an earlier job's agent could have pointed at a repo of its own. A fetch into the
    target with hooks and auto-maintenance off updates the ref the same way, and like the push it
    is not forced (a non-fast-forward is refused) and never updates a checked-out branch."""
    run_git(["--git-dir=" + str(shim), "update-ref", ref, tip], home=home, error_code="push_failed")
    git_dir = _own_git_dir(target)
    args = [f"--git-dir={git_dir}", "-c", "gc.auto=0", "-c", "maintenance.auto=false"]
    run_git(
        [*args, "fetch", "-q", "--no-tags", "--no-write-fetch-head", "--", str(shim), f"{ref}:{ref}"],
        home=home,
        error_code="push_failed",
    )


def _own_git_dir(target: Path) -> Path:
    """The git dir of a local push target, which must be the target itself (a bare repository) or
    its `.git` folder: the allowlists judged the target's path, and a `.git` file, a symlink or a
    `commondir` would carry the update into a repository somewhere else."""
    real = Path(os.path.realpath(target))
    dot_git = real / ".git"
    if os.path.lexists(dot_git):
        if os.path.islink(dot_git) or not dot_git.is_dir():
            raise GitError(f"the push target {target} names another repository (.git)", code="push_failed")
        git_dir = dot_git
    elif (real / "HEAD").is_file() and (real / "objects").is_dir():
        git_dir = real
    else:
        raise GitError(f"the push target {target} is not a git repository", code="push_failed")
    if os.path.lexists(git_dir / "commondir"):
        raise GitError(f"the push target {target} names another repository (commondir)", code="push_failed")
    return git_dir


# Inside a git dir, what git writes through when it commits: a symlink at any of these would carry
# the runner's objects, refs or index into another repository, or its commit message
# (COMMIT_EDITMSG, opened for writing) and reflog lines (appended) into any file the runner can
# write. Also every folder in `objects` and the job branch's reflog (`_git_dir_problem`).
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


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _git_dir_problem(ws: Workspace) -> str | None:
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


def _check_git_dir(ws: Workspace, code: str) -> None:
    problem = _git_dir_problem(ws)
    if problem:
        raise GitError(
            f"{problem}: the runner commits and pushes only in the repository it prepared", code=code
        )


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

    home = _real_dir(settings.data_dir) / "git-home" / job_id
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
            root = _real_dir(settings.workspace_dir)
            if ws.mode == "scratch":
                _remove_tree(ws.path, root)
            elif ws.mode == "worktree":
                _cleanup_worktree(ws, repo, settings, root)
            elif ws.mode == "clone":
                _cleanup_clone(ws, repo, settings, root)
            elif ws.mode == "in_place":
                _cleanup_in_place(ws, repo, settings, recovering=recovering)
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
    if ws.path.parent != _real_dir(settings.workspace_dir):
        return False  # cleanup_workspace refuses it, with the reason
    try:
        os.rmdir(ws.path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _cleanup_worktree(ws: Workspace, repo: RepoLike, settings: Settings, root: Path) -> None:
    assert ws.store is not None and ws.branch is not None and ws.base_commit is not None
    with _repo_lock(settings, _lock_key(repo)):
        run_git(
            [f"--git-dir={ws.store}", "worktree", "remove", "--force", "--force", "--", str(ws.path)],
            home=ws.home,
            check=False,
        )
        _remove_tree(ws.path, root)
        run_git([f"--git-dir={ws.store}", "worktree", "prune"], home=ws.home, check=False)
        _delete_branch_if_unchanged(ws.store, ws.branch, ws.base_commit, ws.home)


def _cleanup_clone(ws: Workspace, repo: RepoLike, settings: Settings, root: Path) -> None:
    assert ws.store is not None and ws.git_dir is not None and ws.branch is not None
    problem = _git_dir_problem(ws)
    tip = None if problem else _try_resolve(ws.git_dir, f"refs/heads/{ws.branch}", ws.home)
    if problem:  # nothing the runner made is in there (its commit refused): the folder just goes
        log.warning("workspace_git_dir_replaced", job_id=ws.job_id, problem=problem)
    if tip is not None and tip != ws.base_commit:
        # The clone goes away, its commits stay: the job branch is kept in the mirror (or local repo).
        with _repo_lock(settings, _lock_key(repo)):
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
    _remove_tree(ws.path, root)


def _cleanup_in_place(ws: Workspace, repo: RepoLike, settings: Settings, *, recovering: bool = False) -> None:
    assert ws.git_dir is not None and ws.branch is not None and ws.base_commit is not None
    _check_git_dir(ws, "cleanup_failed")  # a reset and checkout must not land in another repository
    with _repo_lock(settings, _lock_key(repo)):
        head = rebased_or_head_ref(ws.git_dir)
        if head != f"refs/heads/{ws.branch}" and (
            recovering or (head or "").startswith("refs/heads/runner/")
        ):
            # Another job's branch (it took the folder once this one was failed), or, after a crash
            # or a lost lease, anything but this job's own: not this job's to reset.
            log.warning("in_place_cleanup_skipped", job_id=ws.job_id, head=head)
            _delete_branch_if_unchanged(ws.git_dir, ws.branch, ws.base_commit, ws.home)
            return
        original = ws.original_ref or ws.base_commit
        if head == original:
            # Already back (another instance's recovery did it while this run was frozen, and the
            # operator may work there now): nothing to switch, nothing of the job's to drop.
            log.warning("in_place_cleanup_skipped", job_id=ws.job_id, head=head)
            _delete_branch_if_unchanged(ws.git_dir, ws.branch, ws.base_commit, ws.home)
            return
        # Off the job's branch (the agent switched branches), what is uncommitted may not be the
        # job's: kept in a stash, never dropped.
        keep = recovering or head != f"refs/heads/{ws.branch}"
        _restore_in_place(ws.git_dir, ws.path, ws.branch, ws.job_id, original, ws.home, settings, keep)
        _delete_branch_if_unchanged(ws.git_dir, ws.branch, ws.base_commit, ws.home)


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
        if _run_in(git_dir, path, ["ls-files", "-u", "-z"], home, "cleanup_failed", guard=guard).stdout:
            _run_in(git_dir, path, ["add", "-A"], home, "cleanup_failed", guard=guard)
        _quit_operations(git_dir, path, home, guard)
        message = f"codex-runner: left uncommitted on {branch} by job {job_id} (recovered)"
        stash = ["stash", "push", "--include-untracked", "-q", "-m", message]
        _stash_push(git_dir, path, stash, home, guard, identity)
    else:
        _quit_operations(git_dir, path, home, guard)
        _run_in(git_dir, path, ["reset", "--hard", "-q"], home, "cleanup_failed", guard=guard)
    _run_in(
        git_dir, path, _checkout_back(original, force=not recovering), home, "cleanup_failed", guard=guard
    )
    if not recovering:
        # Only once back, under the ignore rules of the operator's branch: the job's branch may
        # no longer ignore the operator's files (a `.env` its `.gitignore` dropped), and `clean`
        # there deleted them for good.
        _run_in(git_dir, path, ["clean", "-fdq"], home, "cleanup_failed", guard=guard)


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
            _run_in(git_dir, path, [command, "--quit"], home, "cleanup_failed", guard=guard, check=False)
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
    editor's `git status` polling the repo is enough."""
    deadline = time.monotonic() + LOCK_RETRY_SECONDS
    while True:
        got = _run_in(git_dir, path, args, home, "cleanup_failed", guard=guard, env_extra=env, check=False)
        if got.returncode == 0:
            return
        if got.stderr.strip() or time.monotonic() >= deadline:
            detail = got.stderr.strip() or f"exit status {got.returncode}"
            raise GitError(f"git stash failed: {detail}", code="cleanup_failed", exit_code=got.returncode)
        time.sleep(0.05)


def _delete_branch_without_commits(git_dir: Path, branch: str, home: Path) -> bool:
    """Deletes `branch` when every commit on it is on another branch, a tag or a remote-tracking ref
    too (a branch made at its base and never committed to): where the base is not recorded. A
    branch with commits of its own stays. True if there was such a branch."""
    ref = f"refs/heads/{branch}"
    if _try_resolve(git_dir, ref, home) is None:
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


def cleanup_unrecorded(repo: RepoLike, job_id: str, mode: str, settings: Settings) -> bool:
    """What a prepare that never finished may have left, found by the names the runner gives
    (`<workspace dir>/<job id>`, `runner/<id8>`): the run crashed, or was failed by a watchdog,
    before its manifest recorded the workspace (`workspace_record`), or ran with another data
    folder. An in_place repo still on that branch goes back to the branch checked out before it
    (`@{-1}`), what was left uncommitted kept in a stash entry; a branch is deleted only if it has
    no commits of its own. True if something was found."""
    if _keeps_workspace(settings, failed=True) or mode == "scratch" or not _JOB_ID.match(job_id):
        return False
    home = _real_dir(settings.data_dir) / "git-home" / job_id
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    branch = job_branch(job_id)
    try:
        if mode == "in_place":
            return repo.source_type != "git_url" and _unrecorded_in_place(
                repo, job_id, branch, settings, home
            )
        root = _real_dir(settings.workspace_dir)
        path = root / job_id
        found = path.exists() or path.is_symlink()
        store = _unrecorded_store(repo, settings, home) if mode == "worktree" else None
        with _repo_lock(settings, _lock_key(repo)):
            if store is not None:
                remove = ["worktree", "remove", "--force", "--force", "--", str(path)]
                run_git([f"--git-dir={store}", *remove], home=home, check=False)
            if path.exists() or path.is_symlink():
                _remove_tree(path, root)
            if store is not None:
                run_git([f"--git-dir={store}", "worktree", "prune"], home=home, check=False)
                found |= _delete_branch_without_commits(store, branch, home)
        return found
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _unrecorded_store(repo: RepoLike, settings: Settings, home: Path) -> Path | None:
    if repo.source_type == "git_url":
        mirror = _mirror_path(repo, settings)
        return mirror if mirror.is_dir() else None
    source = Path(repo.source)
    if not source.is_dir():
        return None
    return _local_git_dir(source, home, "cleanup_failed")


def _unrecorded_in_place(repo: RepoLike, job_id: str, branch: str, settings: Settings, home: Path) -> bool:
    source = Path(repo.source)
    if not source.is_dir():
        return False
    git_dir = _local_git_dir(source, home, "cleanup_failed")
    with _repo_lock(settings, _lock_key(repo)):
        if head_ref(git_dir) != f"refs/heads/{branch}":
            return False  # the prepare never got to its checkout: the repo is as the operator left it
        before = run_git(
            [f"--git-dir={git_dir}", "rev-parse", "--symbolic-full-name", "@{-1}"], home=home, check=False
        ).stdout.strip()
        if not before.startswith("refs/heads/") or before == f"refs/heads/{branch}":
            before = _try_resolve(git_dir, "@{-1}", home) or ""
        if not before and repo.branch and _try_resolve(git_dir, f"refs/heads/{repo.branch}", home):
            before = f"refs/heads/{repo.branch}"  # no reflog to tell: the repo's configured branch
        if not before:
            raise GitError(
                f"cannot tell which branch {source} was on before {branch}: check it out back",
                code="cleanup_failed",
            )
        _restore_in_place(git_dir, source, branch, job_id, before, home, settings, recovering=True)
        _delete_branch_without_commits(git_dir, branch, home)
    return True


def _delete_branch_if_unchanged(git_dir: Path, branch: str, base_commit: str, home: Path) -> None:
    # update-ref with the expected old value: deletes only a branch still at the base (no commits).
    run_git(
        [f"--git-dir={git_dir}", "update-ref", "-d", f"refs/heads/{branch}", base_commit],
        home=home,
        check=False,
    )


def _remove_tree(path: Path, root: Path) -> None:
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
    (an immutable folder) must not loop. Any other error leaves the entry, which `_remove_tree`
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


# --- small helpers ----------------------------------------------------------------------------------


def _dot_git(source: Path) -> Path:
    dot = source / ".git"
    return dot if dot.exists() else source  # a bare repository is its own git dir
