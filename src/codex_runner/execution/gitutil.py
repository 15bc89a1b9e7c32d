"""Small git helpers shared by the workspace and warm-spare modules: the per-repo lock, commands
pinned to a git dir and work tree, and ref resolution. Synchronous; callers run them in threads."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import re
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from codex_runner.config import Settings
from codex_runner.execution.git import (
    LOCAL_TIMEOUT,
    NETWORK_TIMEOUT,
    GitError,
    GitResult,
    run_git,
    validate_ref_name,
)

# Longer than any one holder's git commands (a fetch, then local ones) can take.
REPO_LOCK_TIMEOUT = NETWORK_TIMEOUT + LOCAL_TIMEOUT

__all__ = [
    "current_branch",
    "filter_guard",
    "git_out",
    "head_ref",
    "lock_key",
    "lock_waits_at_most",
    "real_dir",
    "rebased_or_head_ref",
    "remove_stale_locks",
    "repo_lock",
    "resolve",
    "run_in",
    "try_resolve",
]


@functools.lru_cache(maxsize=256)
def _real_absolute(path: Path) -> Path:
    return path.resolve()


def real_dir(path: Path) -> Path:
    """`path.resolve()` of one of the runner's own folders (data, workspaces, mirrors), worked out once
    per process: a resolve is an `lstat` of every component, and every job needs these several times.
    The answer only changes if someone swaps a symlink above the data folder while the runner runs;
    what it made before and after then stays consistent with what it checks. A relative path is
    resolved each time (it depends on the working folder)."""
    return _real_absolute(path) if path.is_absolute() else path.resolve()


def lock_key(source: str) -> str:
    """Names a repo's mirror, lock and spares by its source: repos sharing a URL share one mirror, and
    a repo whose URL changes gets a new mirror rather than a stale one."""
    name = source.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1].removesuffix(".git")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[:48] or "repo"
    return f"{safe}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"


_lock_waits = threading.local()


@contextmanager
def lock_waits_at_most(seconds: float) -> Iterator[None]:
    """`repo_lock` waits of the calling thread end after `seconds` at most, whatever their own
    timeout: for work that is better skipped than waited for (a watchdog's cleanup, which the next
    job on the repo would do anyway), so that a job holding the lock does not hold it up."""
    before = getattr(_lock_waits, "cap", None)
    _lock_waits.cap = seconds
    try:
        yield
    finally:
        _lock_waits.cap = before


def give_up_lock_waits_when(event: threading.Event) -> None:
    """`repo_lock` waits of the calling thread end (with a `GitError`) once `event` is set: the
    background thread's, so that a shutdown need not wait for a lock held by a job (up to
    `REPO_LOCK_TIMEOUT`) before the process can exit."""
    _lock_waits.stop = event


@contextmanager
def repo_lock(settings: Settings, key: str, *, timeout: float = REPO_LOCK_TIMEOUT) -> Iterator[None]:
    """An exclusive per-repo lock that holds across runner processes on this host (flock).

    Every holder runs git commands bounded by their timeouts, so a wait longer than the longest of
    them means a holder that no longer moves (a frozen process): `prepare_failed` rather than a job
    that waits forever. A thread can also be told to give up (`give_up_lock_waits_when`)."""
    stop: threading.Event | None = getattr(_lock_waits, "stop", None)
    cap: float | None = getattr(_lock_waits, "cap", None)
    timeout = timeout if cap is None else min(timeout, cap)
    locks = real_dir(settings.data_dir) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if stop is not None and stop.is_set():
                    raise GitError(
                        "stopping: gave up waiting for the repo lock", code="prepare_failed"
                    ) from None
                if time.monotonic() >= deadline:
                    raise GitError(
                        f"the repo lock was held by someone else for {timeout:.0f} s", code="prepare_failed"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def run_in(
    git_dir: Path,
    work_tree: Path,
    args: list[str],
    home: Path,
    code: str,
    *,
    check: bool = True,
    env_extra: dict[str, str] | None = None,
    input_text: str | None = None,
    guard: Sequence[tuple[str, str]] = (),
) -> GitResult:
    """A command in a workspace, naming its pinned git dir and work tree explicitly; `guard`
    (`filter_guard`) when the repository's config may be the agent's."""
    return run_git(
        [f"--git-dir={git_dir}", f"--work-tree={work_tree}", *args],
        cwd=work_tree,
        home=home,
        error_code=code,
        check=check,
        env_extra=env_extra,
        input_text=input_text,
        extra_config=guard,
    )


def filter_guard(git_dir: Path, home: Path) -> tuple[tuple[str, str], ...]:
    """Settings that turn off every filter driver the repository's config defines (its includes
    too). An agent that can write that config (a worktree's or in_place repo's shared one, a
    clone's own) could name a program as a driver's `clean`, `smudge` or `process` and have the
    runner's `add`, `checkout` or `reset` run it outside the agent's sandbox. Empty commands are no
    filter; `required` false lets the file through as it is. One git call: made once per stage,
    not per command."""
    got = run_git(
        [f"--git-dir={git_dir}", "config", "--name-only", "--get-regexp", r"^filter\."],
        home=home,
        check=False,
    )
    drivers = sorted(
        {name[len("filter.") :].rsplit(".", 1)[0] for name in got.stdout.splitlines() if name.count(".") >= 2}
    )
    return tuple(
        (f"filter.{driver}.{key}", value)
        for driver in drivers
        for key, value in (("clean", ""), ("smudge", ""), ("process", ""), ("required", "false"))
    )


#: How deep repositories inside repositories (gitlinks) are followed for `nested_guard`: deep
#: enough for any real tree of submodules, and a bound on a loop of links.
MAX_NESTED_DEPTH = 16


def nested_guard(
    git_dir: Path,
    work_tree: Path,
    home: Path,
    code: str,
    guard: Sequence[tuple[str, str]],
    *,
    seen: dict[Path, tuple[tuple[str, str], ...]] | None = None,
    depth: int = 0,
    where: str = "",
) -> tuple[tuple[str, str], ...]:
    """`guard` plus the `filter_guard` of every repository the index links to (gitlinks), and of
    the ones those link to. To see whether such a repository changed, git's `add`, `status` and
    `commit` run `git status` inside it, and that command reads the nested repository's own config
    and attributes, which the agent wrote: a filter driver there would run outside its sandbox.
    Our settings reach that command (git passes GIT_CONFIG_COUNT on to it), so the nested drivers
    are turned off the same way. A gitlink path that is not UTF-8, or nesting deeper than
    `MAX_NESTED_DEPTH`, cannot be guarded and is refused. `seen` (a dict the caller keeps across
    calls of one stage) skips the repositories already read: two git commands per repository."""
    seen = {} if seen is None else seen
    listed = run_in(git_dir, work_tree, ["ls-files", "-s", "-z"], home, code, guard=guard).stdout
    links = [entry.split("\t", 1)[1] for entry in listed.split("\0") if entry.startswith("160000 ")]
    combined = dict.fromkeys(guard)
    for path in links:
        shown = f"{where}{path}"
        if "\ufffd" in path:
            raise GitError("a repository inside the workspace has a path that is not UTF-8", code=code)
        inner = work_tree / path
        inner_git = _nested_git_dir(inner)
        if inner_git is None:
            continue  # not checked out: git does not look inside
        if inner_git in seen:
            combined.update(dict.fromkeys(seen[inner_git]))
            continue
        if depth >= MAX_NESTED_DEPTH:
            raise GitError(f"{shown}: repositories nested more than {MAX_NESTED_DEPTH} deep", code=code)
        seen[inner_git] = ()  # a loop of links ends here
        inner_guard = tuple(dict.fromkeys([*combined, *filter_guard(inner_git, home)]))
        found = nested_guard(
            inner_git, inner, home, code, inner_guard, seen=seen, depth=depth + 1, where=f"{shown}/"
        )
        seen[inner_git] = found
        combined.update(dict.fromkeys(found))
    return tuple(combined)


def gitfile_target(dot_git: Path) -> Path | None:
    """The git dir a `.git` file names ("gitdir: <path>", gitrepository-layout(5)), resolved; None
    when the file is not of that form. Read here rather than by a `git rev-parse` (3 ms). The path
    is taken as git takes it, bytes and all (not UTF-8 is no reason to look elsewhere). Raises
    OSError when it cannot be read."""
    text = os.fsdecode(dot_git.read_bytes())
    if not text.startswith("gitdir: ") or "\n" in text.rstrip("\n"):
        return None
    return (dot_git.parent / text[len("gitdir: ") :].rstrip("\n")).resolve()


def _nested_git_dir(inner: Path) -> Path | None:
    """The git dir of a checked-out nested repository: its `.git` folder, or the folder its `.git`
    file names (a submodule's, in the parent's `.git/modules`); None when there is none."""
    if os.path.islink(inner):
        return None
    dot_git = inner / ".git"
    try:
        if dot_git.is_dir():
            return dot_git.resolve()
        return gitfile_target(dot_git) if dot_git.is_file() else None
    except OSError:
        return None


def git_out(args: list[str], home: Path, code: str) -> str:
    return run_git(args, home=home, error_code=code).stdout.strip()


def try_resolve(git_dir: Path, rev: str, home: Path) -> str | None:
    got = run_git(
        [f"--git-dir={git_dir}", "rev-parse", "-q", "--verify", f"{rev}^{{commit}}"], home=home, check=False
    )
    return got.stdout.strip() if got.returncode == 0 else None


def resolve(git_dir: Path, rev: str, home: Path, *, code: str = "branch_failed") -> str:
    commit = try_resolve(git_dir, rev, home)
    if commit is None:
        shown = rev.removeprefix("refs/remotes/origin/").removeprefix("refs/heads/")
        raise GitError(f"branch {shown!r} not found", code=code)
    return commit


def current_branch(git_dir: Path, home: Path) -> str:
    got = run_git([f"--git-dir={git_dir}", "symbolic-ref", "-q", "--short", "HEAD"], home=home, check=False)
    name = got.stdout.strip()
    if got.returncode != 0 or not name:
        raise GitError("the repo's HEAD is detached; set `branch` for this repo", code="branch_failed")
    validate_ref_name(name)
    return name


def head_ref(git_dir: Path) -> str | None:
    """The ref HEAD names (`refs/heads/main`), read from the file as git would; None when HEAD is
    detached or cannot be read. Opened without following a link and without blocking: the agent
    can write this git dir, and a FIFO in HEAD's place must not hang the runner."""
    text = _read_small(git_dir / "HEAD")
    return text[len("ref: ") :].strip() if text.startswith("ref: ") else None


def rebased_or_head_ref(git_dir: Path) -> str | None:
    """`head_ref`, or while a rebase (or an `am`) holds HEAD detached, the branch it rebases
    (`rebase-merge/head-name`, `rebase-apply/head-name`): a job that left its branch mid-rebase
    is still on it."""
    head = head_ref(git_dir)
    if head is not None:
        return head
    for folder in ("rebase-merge", "rebase-apply"):
        name = _read_small(git_dir / folder / "head-name").strip()
        if name.startswith("refs/heads/"):
            return name
    return None


def _read_small(path: Path) -> str:
    """A small regular file's text, "" when it is anything else or cannot be read (`head_ref`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return os.read(fd, 4096).decode("utf-8", "replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


#: The lock files a git command killed mid-write leaves in a repository's git dir: while one is
#: there every later command that writes the index or HEAD fails ("index.lock: File exists").
_LOCK_NAMES = ("index.lock", "HEAD.lock", "ORIG_HEAD.lock", "packed-refs.lock")


def remove_stale_locks(git_dir: Path, work_tree: Path, branch: str | None = None) -> list[str]:
    """Removes the lock files of `git_dir` (and of `branch`'s ref) that a killed git left: none while
    any process holds one open, or while any git process works in `work_tree` (one running a hook
    or an editor has closed its lock but still owns it). The caller knows its own job's processes
    are gone (a cancel's, a shutdown's, a crash's kill). Returns the names removed. Reading every
    process's open files is slow, so it only happens when a lock exists."""
    names = [*_LOCK_NAMES, *([f"refs/heads/{branch}.lock"] if branch else [])]
    present = [git_dir / name for name in names if (git_dir / name).is_file()]
    if not present:
        return []
    held, busy = _lock_holders(os.path.realpath(work_tree), os.path.realpath(git_dir))
    if busy:
        return []
    removed = []
    for path in present:
        if os.path.realpath(path) not in held:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(str(path.relative_to(git_dir)))
    return removed


def _lock_holders(*trees: str) -> tuple[set[str], bool]:
    """The paths every process this user can see holds open (/proc/<pid>/fd), and whether a git
    process works inside one of `trees` (its current folder there)."""
    held: set[str] = set()
    busy = False
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        proc = f"/proc/{entry.name}"
        with contextlib.suppress(OSError):
            with open(f"{proc}/comm") as fh:
                is_git = fh.read().strip().startswith("git")
            if is_git:
                cwd = os.readlink(f"{proc}/cwd")
                busy |= any(cwd == tree or cwd.startswith(tree + os.sep) for tree in trees)
        try:
            fds = os.scandir(f"{proc}/fd")
        except OSError:
            continue
        with fds:
            for fd in fds:
                with contextlib.suppress(OSError):
                    held.add(os.readlink(fd.path))
    return held, busy
