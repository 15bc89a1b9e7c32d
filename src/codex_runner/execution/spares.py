"""Warm workspaces ("spares"): a checkout of a repo's base commit that the runner makes in the
background after a job's prepare, so that the next job of the same repo and mode starts from it
instead of writing every file of the tree again.

A CI runner keeps its checkout between builds (Buildkite's agents, GitHub's self-hosted runners);
here a spare is never one an agent has touched. The runner makes it, then hands it to exactly one
job: it is renamed into the job's workspace folder (an atomic claim: two jobs never get the same
spare), its git configuration is written again, and it is forced onto the job's base commit on the
job branch and cleaned — the tree a fresh checkout would give, with only the files that differ
written. A spare that cannot be used is deleted and the job prepares the ordinary way.

Layout: `<workspace dir>/.spares/<repo key>.<mode>/ready-<id>`, built as `building-<id>` (with its
git HOME `home-<id>`) and renamed when complete, so an interrupted build is never taken.
`RUNNER_WARM_WORKSPACES` spares are kept per repo and mode (0: none). `clone` and `worktree`
workspaces have spares; `in_place` and `scratch` do not. A `clone` spare of a URL repo borrows the
mirror's objects, as the job's clone does; one of a local repo owns them (a hard-linked `git clone`
of the repo, like the job's clone) and is brought up to date by a fetch from the repo when taken.
"""

from __future__ import annotations

import os
import shlex
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from codex_runner.config import Settings
from codex_runner.execution.git import GitError, install_script, run_git
from codex_runner.execution.gitutil import (
    filter_guard,
    git_out,
    gitfile_target,
    give_up_lock_waits_when,
    real_dir,
    repo_lock,
    run_in,
)
from codex_runner.execution.spare_watch import watch

__all__ = [
    "SpareSource",
    "pool_dir",
    "refill_later",
    "resume_refills",
    "run_in_background",
    "stop_refills",
    "take_spare",
    "wait_for_refills",
]

log = structlog.get_logger("codex_runner.spares")

POOLS = ".spares"
# A build older than this was interrupted (its process died): its leftovers are deleted.
STALE_BUILD_SECONDS = 900
# About 1,500 files: below this an index is not worth settling (see `_settle_index`).
_SETTLE_MIN_INDEX_BYTES = 128 * 1024
# For the one checkout that takes an untouched spare (see spare_watch.py): a version-2 fsmonitor hook
# whose answer is "nothing changed since the token", so git uses the index's stat data as it is
# instead of an lstat of every file. Only that command runs with it; every other git command has
# `core.fsmonitor=false`, which also makes the next one drop the index's fsmonitor extension.
_FSMONITOR_HOOK_NAME = "fsmonitor-untouched-spare"
_FSMONITOR_HOOK = (
    "#!/bin/sh\n"
    "# codex-runner: this spare was watched and nothing in it changed.\n"
    "printf 'codex-runner-spare\\0'\n"
)
_CLONE_CONFIG = (
    "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n"
    "\tlogallrefupdates = true\n"
    '[remote "origin"]\n\turl = {url}\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n'
)


@dataclass(frozen=True)
class SpareSource:
    """What a spare is made from and for: the repo's lock key, the workspace mode, the git dir whose
    objects it borrows (mirror or local repo), the URL a clone names as origin, and the commit."""

    key: str
    mode: str  # "clone" | "worktree"
    store: Path
    origin: str
    commit: str
    #: A `clone` that owns its objects (hard-linked from a local repo, `origin` its path) instead of
    #: borrowing `store`'s through `objects/info/alternates`.
    owns_objects: bool = False


def pool_dir(settings: Settings, key: str, mode: str) -> Path:
    return real_dir(settings.workspace_dir) / POOLS / f"{key}.{mode}"


# --- taking a spare ---------------------------------------------------------------------------------


def take_spare(
    settings: Settings, src: SpareSource, path: Path, base_branch: str, branch: str, home: Path
) -> Path | None:
    """Moves a ready spare to the workspace folder `path` (which must not exist) and puts it on
    `branch` at `src.commit`. Returns its git dir, or None when there is no usable spare."""
    if settings.warm_workspaces <= 0:
        return None
    pool = pool_dir(settings, src.key, src.mode)
    try:
        names = sorted(n for n in os.listdir(pool) if n.startswith("ready-"))
    except FileNotFoundError:
        return None
    for name in names:
        if path.exists():  # never rename over a folder: the caller's checks say it is free
            return None
        try:
            git_dir = _claim(settings, src, pool / name, path, home)
            if git_dir is None:
                continue  # another job took it first
            _reset(git_dir, path, src, base_branch, branch, home, untouched=watch.take(path))
            return git_dir
        except (GitError, OSError) as exc:
            log.warning("spare_unusable", pool=str(pool), error=str(exc)[:300])
            _discard(settings, src, path, home)
            if src.mode == "worktree":  # the job branch may exist already; the fresh path makes it again
                with repo_lock(settings, src.key):
                    ref = f"refs/heads/{branch}"
                    run_git(
                        [f"--git-dir={src.store}", "update-ref", "-d", ref, src.commit],
                        home=home,
                        check=False,
                    )
            return None
    return None


def _claim(settings: Settings, src: SpareSource, spare: Path, path: Path, home: Path) -> Path | None:
    """Renames the spare to `path`; None if it is gone. Raises if it came but cannot be relinked."""
    if src.mode != "worktree":
        return path / ".git" if _rename(spare, path) else None
    # Under the repo lock: a `worktree prune` run between the rename and the repair would drop the
    # registration of a worktree whose recorded folder is gone.
    with repo_lock(settings, src.key):
        if not _rename(spare, path):
            return None
        run_git(
            [f"--git-dir={src.store}", "worktree", "repair", "--", str(path)],
            home=home,
            error_code="branch_failed",
        )
    git_dir = _linked_git_dir(path)
    if git_dir.parent != src.store / "worktrees":
        raise GitError("spare worktree belongs to another repository", code="branch_failed")
    return git_dir


def _linked_git_dir(work_tree: Path) -> Path:
    """The git dir a worktree's `.git` file names (`gitfile_target`). The checkout that follows
    fails if it is no repo."""
    try:
        target = gitfile_target(work_tree / ".git")
    except OSError as exc:
        raise GitError(f"spare worktree has no .git link: {exc}", code="branch_failed") from None
    if target is None:
        raise GitError("spare worktree has a malformed .git link", code="branch_failed")
    return target


def _rename(spare: Path, path: Path) -> bool:
    try:
        os.rename(spare, path)
    except FileNotFoundError:
        return False
    return True


def _reset(
    git_dir: Path, path: Path, src: SpareSource, base_branch: str, branch: str, home: Path, *, untouched: bool
) -> None:
    if src.mode == "clone" and src.owns_objects:
        # Written again rather than trusted, and never borrowing: the job's clone stays independent
        # of the repo. The fetch brings the commits made since the build and every branch as it is
        # now (a fresh clone's remote-tracking branches); the objects it adds are copied, few.
        _write_file(git_dir / "config", _CLONE_CONFIG.format(url=_config_quote(src.origin)))
        (git_dir / "objects" / "info" / "alternates").unlink(missing_ok=True)
        # `--prune-tags` too: `--prune` alone keeps tags the repo deleted since the build, and
        # `--force` takes a tag the repo moved, as a fresh clone would have them.
        run_in(
            git_dir,
            path,
            ["fetch", "-q", "--prune", "--prune-tags", "--force", "--tags", "origin"],
            home,
            "clone_failed",
        )
        # And `origin/HEAD` as a fresh clone has it: the repo's current branch (it may have
        # switched, and the branch the spare's points at may be gone), or none for a detached HEAD.
        got = run_in(
            git_dir, path, ["remote", "set-head", "origin", "--auto"], home, "clone_failed", check=False
        )
        if got.returncode != 0:
            run_in(
                git_dir, path, ["remote", "set-head", "origin", "--delete"], home, "clone_failed", check=False
            )
    elif src.mode == "clone":
        # Written again rather than trusted: the same configuration and objects a fresh clone gets.
        _write_file(git_dir / "config", _CLONE_CONFIG.format(url=_config_quote(src.origin)))
        _write_file(git_dir / "objects" / "info" / "alternates", f"{src.store / 'objects'}\n")
        # The remote-tracking branch a fresh clone has, as a loose ref: the spare was made by `git init`
        # (the files backend, no packed refs), so a file write does what `update-ref` would, 3 ms sooner.
        # The name passed git's ref rules; the checkout below fails if the commit is not there.
        ref = git_dir / "refs" / "remotes" / "origin" / base_branch
        ref.parent.mkdir(parents=True, exist_ok=True)
        _write_file(ref, f"{src.commit}\n")
    # -f: whatever differs from the commit is overwritten; files that already match are not written.
    checkout = ["checkout", "-q", "-f", "-b", branch, src.commit]
    # A worktree spare shares the store's config with earlier jobs' agents (`filter_guard`); a
    # clone spare's config was just written again from fixed text.
    guard = filter_guard(git_dir, home) if src.mode == "worktree" else ()
    if untouched:
        # Nothing changed since the build checked it (spare_watch.py): no file needs an lstat, and
        # there is nothing untracked to clean.
        run_in(git_dir, path, [*_trusting(home), *checkout], home, "branch_failed", guard=guard)
        return
    run_in(git_dir, path, checkout, home, "branch_failed", guard=guard)
    run_in(git_dir, path, ["clean", "-ffdxq"], home, "branch_failed", guard=guard)


def _trusting(home: Path) -> list[str]:
    """git options that make one command use the untouched-spare fsmonitor hook."""
    hook = install_script(home, _FSMONITOR_HOOK_NAME, _FSMONITOR_HOOK)
    return ["-c", f"core.fsmonitor={shlex.quote(str(hook))}", "-c", "core.fsmonitorHookVersion=2"]


def _config_quote(value: str) -> str:
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise GitError("repo source has a control character", code="clone_failed")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _write_file(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.runner-tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --- making spares ----------------------------------------------------------------------------------


def build_spare(settings: Settings, src: SpareSource) -> bool:
    """Makes one spare if the pool has fewer than `RUNNER_WARM_WORKSPACES`. True if one was made."""
    pool = pool_dir(settings, src.key, src.mode)
    pool.mkdir(parents=True, exist_ok=True)
    _sweep(settings, src, pool)
    if len([n for n in os.listdir(pool) if n.startswith("ready-")]) >= settings.warm_workspaces:
        return False
    ident = uuid.uuid4().hex[:12]
    building, home = pool / f"building-{ident}", pool / f"home-{ident}"
    home.mkdir(mode=0o700)
    try:
        if src.mode == "worktree":
            with repo_lock(settings, src.key):
                add = ["worktree", "add", "-q", "--detach", "--no-checkout", "--", str(building), src.commit]
                run_git([f"--git-dir={src.store}", *add], home=home, error_code="branch_failed")
            git_dir = Path(
                git_out(["-C", str(building), "rev-parse", "--absolute-git-dir"], home, "branch_failed")
            )
            guard = filter_guard(git_dir, home)  # the store's config is shared with agents
            run_in(git_dir, building, ["reset", "--hard", "-q"], home, "branch_failed", guard=guard)
        elif src.owns_objects:
            _build_local_clone(src, building, home)
        else:
            run_git(["init", "-q", "--", str(building)], home=home, error_code="clone_failed")
            _write_file(building / ".git" / "objects" / "info" / "alternates", f"{src.store / 'objects'}\n")
            run_in(
                building / ".git", building, ["checkout", "-q", "--detach", src.commit], home, "branch_failed"
            )
        _settle_index(git_dir if src.mode == "worktree" else building / ".git", building, home)
        _publish(settings, src, building, pool / f"ready-{ident}", home)
        return True
    except BaseException:
        _discard(settings, src, building, home)
        raise
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _build_local_clone(src: SpareSource, building: Path, home: Path) -> None:
    """The job's own way of cloning a local repo (hard links), detached at the commit. The local
    branch `clone` makes is deleted: at take it would be as old as the spare, and the job gets its
    own branch anyway; the remote-tracking branches are refreshed by the take's fetch."""
    run_git(
        ["clone", "-q", "--no-checkout", "--", src.origin, str(building)],
        home=home,
        error_code="clone_failed",
    )
    git_dir = building / ".git"
    run_in(git_dir, building, ["checkout", "-q", "--detach", src.commit], home, "branch_failed")
    branches = git_out(
        [f"--git-dir={git_dir}", "for-each-ref", "--format=%(refname)", "refs/heads/"], home, "clone_failed"
    )
    for ref in branches.splitlines():
        run_git([f"--git-dir={git_dir}", "update-ref", "-d", ref], home=home, error_code="clone_failed")


def _settle_index(git_dir: Path, work_tree: Path, home: Path) -> None:
    """Files written in the same second as the index are "racily clean" to git: it cannot trust their
    stat data and would read or rewrite every one of them at the job's checkout. Refreshing the index
    once that second has passed records them as clean, so the checkout only touches what changed.

    The work tree is watched from before that refresh (spare_watch.py), and the refresh records in
    the index that git may trust each file's stat data. If it finds no file changed and no file
    untracked, the spare counts as checked: taken untouched, it needs neither an lstat of every file
    nor a clean."""
    index = git_dir / "index"
    info = index.stat()
    if info.st_size < _SETTLE_MIN_INDEX_BYTES:
        return  # a small tree is re-read in a few milliseconds: not worth the wait
    watched = watch.start(work_tree)
    wait = info.st_mtime + 1.05 - time.time()
    if wait > 0:
        time.sleep(wait)
    # No fsmonitor data in the index yet: git does not ask the hook, it looks at every file and marks
    # the ones that match as valid. Without -q a changed file makes it fail. Index version 4 (what
    # git's `feature.manyFiles` turns on) compresses the paths: the take reads and writes a third
    # less (5-8 ms fewer for 20,000 files).
    refresh = ["update-index", "--index-version", "4", "--refresh"]
    refreshed = run_in(git_dir, work_tree, [*_trusting(home), *refresh], home, "branch_failed", check=False)
    if not watched:
        return
    others = run_in(
        git_dir, work_tree, ["ls-files", "-z", "--others", "--directory"], home, "branch_failed", check=False
    )
    if refreshed.returncode == 0 and others.returncode == 0 and not others.stdout:
        watch.verified(work_tree)
    else:
        watch.forget(work_tree)


def _publish(settings: Settings, src: SpareSource, building: Path, ready: Path, home: Path) -> None:
    if src.mode != "worktree":
        os.rename(building, ready)
        return
    with repo_lock(settings, src.key):
        os.rename(building, ready)
        run_git(
            [f"--git-dir={src.store}", "worktree", "repair", "--", str(ready)],
            home=home,
            error_code="branch_failed",
        )


def _sweep(settings: Settings, src: SpareSource, pool: Path) -> None:
    """Deletes what an interrupted build left, and spares past the configured number."""
    cutoff = time.time() - STALE_BUILD_SECONDS
    ready = sorted(n for n in os.listdir(pool) if n.startswith("ready-"))
    extra = set(ready[settings.warm_workspaces :])
    for name in os.listdir(pool):
        path = pool / name
        if name in extra:
            # Claimed first, by a rename out of `ready-`, as a job's take claims a spare: else a
            # take could rename it into a job's workspace while it is being deleted (the deletion
            # follows the folder it opened, wherever it is renamed to). One of the two renames wins.
            doomed = pool / f"discard-{uuid.uuid4().hex[:12]}"
            if _rename(path, doomed):
                _discard(settings, src, doomed, None)
        elif name.startswith(("building-", "home-", "discard-")) and _mtime(path) < cutoff:
            _discard(settings, src, path, None)


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _discard(settings: Settings, src: SpareSource, path: Path, home: Path | None) -> None:
    watch.forget(path)
    shutil.rmtree(path, ignore_errors=True)
    if src.mode == "worktree":
        # The registration of the deleted worktree goes with the next prune; do it now.
        scratch = home or path.with_name(f"home-{uuid.uuid4().hex[:12]}")
        try:
            with repo_lock(settings, src.key):
                run_git([f"--git-dir={src.store}", "worktree", "prune"], home=scratch, check=False)
        finally:
            if home is None:
                shutil.rmtree(scratch, ignore_errors=True)


# --- the background refill --------------------------------------------------------------------------


class _Background:
    """One thread per process does the workspace layer's background work, one task at a time, newest
    request first: making spares, and the mirrors' upkeep (mirror.py). A request whose key is
    already waiting replaces it (a spare's commit is newer; a second upkeep is the same upkeep). Not a
    daemon thread: at exit the task in progress finishes instead of leaving a git process behind.
    Once stopped it takes no request until `resume` (the next launcher's start): a job's prepare that
    outlived the shutdown would otherwise start a build after it, which holds the process's exit."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[object, tuple[str, Callable[[], object]]] = {}
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._stopping = threading.Event()  # ends the thread's repo lock waits (`repo_lock`)

    def request(self, key: object, what: str, task: Callable[[], object]) -> None:
        with self._cond:
            if self._stopped:
                return
            self._pending.pop(key, None)  # re-inserted: newest last, so taken first
            self._pending[key] = (what, task)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="workspace-background")
                self._thread.start()

    def _run(self) -> None:
        give_up_lock_waits_when(self._stopping)
        while True:
            with self._cond:
                if not self._pending or self._stopped:
                    self._thread = None
                    self._cond.notify_all()
                    return
                key, (what, task) = self._pending.popitem()
            try:
                task()
            except Exception as exc:  # an optimisation or upkeep: its failure never reaches a job
                log.warning("background_task_failed", task=what, key=str(key), error=str(exc)[:300])

    def wait(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._thread is None, timeout)

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._stopped = True
            self._stopping.set()
            self._pending.clear()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def resume(self) -> None:
        with self._cond:
            self._stopped = False
            self._stopping.clear()


_background = _Background()


def refill_later(settings: Settings, src: SpareSource) -> None:
    """Asks for a spare of `src` to be made in the background (nothing when spares are off)."""
    if settings.warm_workspaces > 0:
        pool = pool_dir(settings, src.key, src.mode)
        _background.request(pool, "spare", lambda: build_spare(settings, src))


def run_in_background(key: object, what: str, task: Callable[[], object]) -> None:
    """Runs `task` in the workspace layer's background thread; a waiting task of the same key is
    replaced. Failures are logged, never raised."""
    _background.request(key, what, task)


def wait_for_refills(timeout: float = 60.0) -> bool:
    """Waits until no background task (spare or upkeep) runs; True if so within `timeout` (tests and
    benchmarks)."""
    return _background.wait(timeout)


def stop_refills(timeout: float = 30.0) -> None:
    """Shutdown: drops pending requests, takes no more until `resume_refills`, and waits (at most
    `timeout`) for the build in progress; a build still waiting for a repo lock gives up."""
    _background.stop(timeout)


def resume_refills() -> None:
    """Background work is taken again after `stop_refills`: a launcher's start (a later runtime in
    the same process, as in tests)."""
    _background.resume()
