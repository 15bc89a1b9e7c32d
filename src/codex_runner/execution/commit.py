"""The job's commit on its branch, and the push of that branch (SPEC §6). Pushes run from a throw-away
bare repository that borrows the workspace's objects: a credential never meets a configuration file
the agent could have edited."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from codex_runner.execution.git import GitCredential, GitError, run_git, validate_source
from codex_runner.execution.gitutil import filter_guard, git_out, nested_guard, resolve, run_in, try_resolve
from codex_runner.execution.mirror import remote_git
from codex_runner.execution.workspace_base import (
    NO_CHANGES,
    CommitResult,
    RepoLike,
    Workspace,
    check_git_dir,
    first_few,
)


def commit_changes(ws: Workspace, *, message: str, author_name: str, author_email: str) -> CommitResult:
    """Commits everything the script changed (`git add -A`, .gitignore respected) on the job branch and
    counts it against the base commit. Nothing changed: commit None and zeros."""
    if ws.git_dir is None or ws.branch is None or ws.base_commit is None:
        return NO_CHANGES
    check_git_dir(ws, "commit_failed")
    ref = f"refs/heads/{ws.branch}"
    # The agent may have switched or deleted branches: the job's commit still goes on the job branch.
    head = run_in(ws.git_dir, ws.path, ["symbolic-ref", "-q", "HEAD"], ws.home, "commit_failed", check=False)
    if head.stdout.strip() != ref:
        if try_resolve(ws.git_dir, ref, ws.home) is None:
            run_in(ws.git_dir, ws.path, ["update-ref", ref, ws.base_commit], ws.home, "commit_failed")
        run_in(ws.git_dir, ws.path, ["symbolic-ref", "HEAD", ref], ws.home, "commit_failed")
    # The agent could write this config. Read once HEAD is where `add` finds it: an
    # `includeIf "onbranch:..."` it added applies only on the branch HEAD names at that moment.
    guard = filter_guard(ws.git_dir, ws.home)
    # And the config of every repository the index links to (`nested_guard`): before `add`, which
    # looks inside the ones already linked, and after it, for `commit`, which looks inside all.
    seen: dict[Path, tuple[tuple[str, str], ...]] = {}
    guard = nested_guard(ws.git_dir, ws.path, ws.home, "commit_failed", guard, seen=seen)
    run_in(ws.git_dir, ws.path, ["add", "-A"], ws.home, "commit_failed", guard=guard)
    guard = nested_guard(ws.git_dir, ws.path, ws.home, "commit_failed", guard, seen=seen)
    # Links to repositories of the agent's own, staged now or committed by the agent itself.
    _refuse_stray_gitlinks(ws, guard)
    staged = run_in(
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
    tip = resolve(ws.git_dir, ref, ws.home, code="commit_failed")
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
    `check_git_dir`: the runner then wrote over any file it can write. No hook or editor either,
    and no merge or cherry-pick the agent left in progress is taken over: one parent, our author."""
    assert ws.git_dir is not None
    tree = run_in(ws.git_dir, ws.path, ["write-tree"], ws.home, "commit_failed", guard=guard).stdout.strip()
    parent = resolve(ws.git_dir, ref, ws.home, code="commit_failed")
    commit = run_in(
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
    run_in(ws.git_dir, ws.path, update, ws.home, "commit_failed")


def _refuse_stray_gitlinks(ws: Workspace, guard: tuple[tuple[str, str], ...]) -> None:
    """A folder the agent made a repository of its own (`git init`, as scaffolding tools do) is
    staged by `add -A` as a link to its commit, not as its files: the commit would name a commit
    that is never pushed, and the files would go with the workspace. Refused unless `.gitmodules`
    lists it (a submodule the agent added on purpose)."""
    assert ws.git_dir is not None and ws.base_commit is not None
    # From the base commit to the index: what `add -A` staged and what the agent committed itself.
    raw = run_in(
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
    listed = run_in(
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
            f"{first_few(stray)}: a git repository of its own inside the workspace (a `git init` there?); its files "
            "cannot be committed, only a link to a commit that is never pushed. Remove its .git folder, "
            "or add it as a submodule (.gitmodules)",
            code="commit_failed",
        )


def _numstat(ws: Workspace, tip: str) -> CommitResult:
    assert ws.git_dir is not None and ws.base_commit is not None
    # Plumbing, so no external diff or textconv program configured in the workspace runs.
    out = run_in(
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
    check_git_dir(ws, "push_failed")
    tip = resolve(ws.git_dir, f"refs/heads/{ws.branch}", ws.home, code="push_failed")
    objects = Path(
        git_out([f"--git-dir={ws.git_dir}", "rev-parse", "--git-path", "objects"], ws.home, "push_failed")
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
        remote_git(
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
