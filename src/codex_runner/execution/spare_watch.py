"""Knowing that a spare is untouched without looking at each of its files again.

Taking a spare used to mean one `lstat` of every tracked file (`checkout -f`) and a walk of every
folder (`clean`): 60-100 ms for 20,000 files, most of what was left of a second job's prepare. Both
exist only to undo changes made to the spare while it waited. So from the moment a big spare's index
is settled until a job takes it, an inotify watch on every folder of its work tree reports any
change: a file written, created, deleted, renamed or chmod-ed anywhere in it. A spare with no event
is taken with git trusting its index (through a one-command fsmonitor hook that answers "nothing
changed", see spares.py); any event, a lost event queue, a restart, or a spare this process did not
watch, and it is checked the old way.

What it does not see, and why that is acceptable:
- writes through a shared memory mapping made before the watch began: nothing of the runner's maps a
  spare's files, and a process of the service's user could change a mirror's objects just as well
  (docs/git.md says spares protect against a job's leftovers, not against the service's own user);
- the `.git` link of a `worktree` spare and a `clone` spare's `.git` folder: the first is checked on
  take (its git dir must belong to the repo), and the second's config and alternates are written
  again on take, while the index and HEAD it holds are overwritten by the checkout.

One inotify descriptor per process, read only when a spare is taken (no thread): the kernel queues
events in between, up to `max_queued_events`; an overflow marks every watched spare as touched.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from inotify_simple import INotify, flags

__all__ = ["MAX_FOLDERS", "SpareWatch", "available", "watch"]

log = structlog.get_logger("codex_runner.spares")

# Each watch costs the kernel about 1 KiB and counts against `fs.inotify.max_user_watches`; a tree with
# more folders than this is checked the old way instead.
MAX_FOLDERS = 20_000
# All spares together take at most this share of `fs.inotify.max_user_watches`: the limit is the
# user's, and the agents (the same user) run file watchers of their own (dev servers, test
# watchers), which would fail with ENOSPC once the runner held them all.
WATCH_SHARE = 0.25
_DEFAULT_MAX_USER_WATCHES = 8192


def watch_budget() -> int:
    """How many watches this process's spares may hold in all."""
    try:
        limit = int(Path("/proc/sys/fs/inotify/max_user_watches").read_text().strip())
    except (OSError, ValueError):
        limit = _DEFAULT_MAX_USER_WATCHES
    return max(1, int(limit * WATCH_SHARE))


# Every event that changes what is in a folder or a file's content, mode or times. Reads (ACCESS,
# OPEN, CLOSE_NOWRITE) are left out: git reading the spare is not a change. MOVE_SELF is left out
# because the runner renames a spare's root itself (publish, claim); a sub-folder moved away is
# reported as MOVED_FROM by its parent, which is watched.
_CHANGES = (
    flags.MODIFY
    | flags.ATTRIB
    | flags.CLOSE_WRITE
    | flags.CREATE
    | flags.DELETE
    | flags.MOVED_FROM
    | flags.MOVED_TO
    | flags.DELETE_SELF
)
_WATCH_MASK = _CHANGES | flags.ONLYDIR | flags.DONT_FOLLOW


@dataclass
class _Watched:
    root_wd: int
    wds: list[int] = field(default_factory=list)
    verified: bool = False  # set once the build's own checks passed after the watch began
    touched: bool = False


class SpareWatch:
    """The spares this process watches, keyed by their root folder's (device, inode): a rename keeps
    both, and a folder swapped in under the spare's name has another inode, so it is not trusted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: INotify | None = None
        self._spares: dict[tuple[int, int], _Watched] = {}
        self._by_wd: dict[int, tuple[int, int]] = {}
        self._budget = watch_budget()

    def start(self, root: Path) -> bool:
        """Watches every folder of `root` except `.git`, before anything in it is listed, so a change
        made while the watches are added is either listed or reported. False if it could not."""
        try:
            key = _key(root)
        except OSError:
            return False
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = INotify(nonblocking=True)  # close-on-exec: no child inherits it
                except OSError as exc:
                    log.info("spare_watch_unavailable", error=str(exc))
                    return False
            # Events already queued (a lost queue among them) concern the spares watched before.
            self._drain()
            entry = _Watched(root_wd=-1)
            self._spares[key] = entry
            try:
                self._add_tree(root, key, entry)
            except (OSError, _TooManyFolders) as exc:
                log.info("spare_not_watched", root=str(root), error=str(exc)[:200])
                self._drop(key)
                return False
            return True

    def _add_tree(self, root: Path, key: tuple[int, int], entry: _Watched) -> None:
        assert self._fd is not None
        stack = [str(root)]
        while stack:
            folder = stack.pop()
            if len(entry.wds) >= MAX_FOLDERS:
                raise _TooManyFolders(f"more than {MAX_FOLDERS} folders")
            if len(self._by_wd) >= self._budget:
                raise _TooManyFolders(
                    f"the spares' watches would pass {self._budget} "
                    f"({WATCH_SHARE:.0%} of fs.inotify.max_user_watches)"
                )
            wd = self._fd.add_watch(folder, _WATCH_MASK)
            entry.wds.append(wd)
            self._by_wd[wd] = key
            if entry.root_wd < 0:
                entry.root_wd = wd
            with os.scandir(folder) as listing:
                for item in listing:
                    if item.is_dir(follow_symlinks=False) and not (
                        folder == str(root) and item.name == ".git"
                    ):
                        stack.append(item.path)

    def verified(self, root: Path) -> None:
        """The build's checks after `start` passed: from now on an untouched spare is pristine."""
        with self._lock:
            found = self._find(root)
            if found is not None:
                found[1].verified = True

    def take(self, root: Path) -> bool:
        """Stops watching `root` (a job has it now). True only if it was watched, verified, and
        nothing changed in it since the watch began."""
        with self._lock:
            found = self._find(root)
            if found is None:
                return False
            key, entry = found
            self._drop(key)
            return entry.verified and not entry.touched

    def forget(self, root: Path) -> None:
        """Stops watching `root` if it is watched (a spare discarded or not trusted)."""
        with self._lock:
            found = self._find(root)
            if found is not None:
                self._drop(found[0])

    def _find(self, root: Path) -> tuple[tuple[int, int], _Watched] | None:
        """Under the lock: the events queued so far applied, then `root`'s key and watch, if any."""
        self._drain()
        try:
            key = _key(root)
        except OSError:
            return None
        entry = self._spares.get(key)
        return None if entry is None else (key, entry)

    def _drain(self) -> None:
        if self._fd is None:
            return
        for event in self._fd.read(timeout=0):
            if event.mask & flags.Q_OVERFLOW:
                for entry in self._spares.values():
                    entry.touched = True
                continue
            key = self._by_wd.get(event.wd)
            if key is None:
                continue  # a watch already dropped
            entry = self._spares[key]
            if event.mask & flags.IGNORED:
                # The folder is gone or its watch was removed: it can no longer report changes.
                del self._by_wd[event.wd]
                entry.touched = True
                if event.wd == entry.root_wd:  # the spare itself was deleted: forget it
                    self._drop(key)
                continue
            if event.wd == entry.root_wd and event.name == ".git":
                continue  # the worktree link: rewritten by `git worktree repair`, checked on take
            entry.touched = True

    def _drop(self, key: tuple[int, int]) -> None:
        entry = self._spares.pop(key)
        for wd in entry.wds:
            if self._by_wd.pop(wd, None) is not None and self._fd is not None:
                with contextlib.suppress(OSError):  # the folder is gone: the kernel dropped the watch
                    self._fd.rm_watch(wd)


class _TooManyFolders(Exception):
    pass


def available() -> bool:
    """Whether this process can make an inotify instance at all (`doctor`)."""
    try:
        INotify().close()
    except OSError:
        return False
    return True


def _key(root: Path) -> tuple[int, int]:
    info = os.lstat(root)
    return info.st_dev, info.st_ino


watch = SpareWatch()
