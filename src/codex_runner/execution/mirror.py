"""The mirror cache of URL repos (SPEC §6): `<data dir>/mirrors/<repo>-<hash>.git`, made on first use
and refreshed with one `git fetch --prune` per job under the repo lock; and `remote_git`, the one way a
command talks to a remote."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from codex_runner.config import Settings
from codex_runner.execution.git import (
    NETWORK_TIMEOUT,
    GitCredential,
    GitError,
    GitResult,
    is_plain_http,
    run_git,
    url_host,
    validate_ref_name,
    without_user,
)
from codex_runner.execution.gitutil import real_dir, repo_lock
from codex_runner.execution.workspace_base import RepoLike, repo_lock_key, task_home

# Remote branches live under refs/remotes/origin in the mirror, so `fetch --prune` never touches the
# job branches (refs/heads/runner/*) that worktrees of the mirror have checked out or that cleanup kept.
_MIRROR_REFSPECS = ("+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*")
# Rewritten before every fetch: a worktree of the mirror shares this file with the agent, and the fetch
# is the one command that carries a credential.
_MIRROR_CONFIG = "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = true\n"


def mirror_path(repo: RepoLike, settings: Settings) -> Path:
    return real_dir(settings.mirrors_dir) / f"{repo_lock_key(repo)}.git"


def sync_mirror(repo: RepoLike, mirror: Path, home: Path, credential: GitCredential | None) -> None:
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
    remote_git(
        [
            f"--git-dir={mirror}",
            "fetch",
            "-q",
            "--prune",
            "--no-tags",
            "--no-write-fetch-head",
            "--no-auto-maintenance",  # done after the prepare, in the background: `upkeep_mirror`
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


def upkeep_mirror(settings: Settings, repo: RepoLike, mirror: Path) -> None:
    """`git maintenance run --auto` of a mirror, in the background after a job's fetch, which skips it:
    once enough packs pile up (one per fetch that brings more than 100 objects) it repacks the
    mirror, which takes seconds on a big repo and would otherwise happen inside one job's prepare.
    Under the repo lock, like every other write to the mirror."""
    with task_home(settings, "upkeep") as home, repo_lock(settings, repo_lock_key(repo)):
        if mirror.exists():  # retention may have deleted it since
            run_git([f"--git-dir={mirror}", "maintenance", "run", "--auto", "--quiet"], home=home)


def remote_default_branch(repo: RepoLike, home: Path, credential: GitCredential | None) -> str:
    out = remote_git(
        ["ls-remote", "--symref", "--", repo.source, "HEAD"], repo.source, credential, home, "clone_failed"
    ).stdout
    for line in out.splitlines():
        if line.startswith("ref: refs/heads/") and line.endswith("\tHEAD"):
            name = line[len("ref: refs/heads/") : -len("\tHEAD")]
            validate_ref_name(name)
            return name
    raise GitError("the remote names no default branch; set `branch` for this repo", code="branch_failed")


def remote_git(
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
