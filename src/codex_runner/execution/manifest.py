"""The run manifest: `<data dir>/runs/<job_id>/manifest.json` and its `.heartbeat` (SPEC §3).

Readers (operators, backups, crash recovery) may open the manifest at any moment, so it is only
ever replaced whole: written to a temporary file in the same folder, then renamed over the old one.
A reader sees the previous document or the new one, never a mix. A durable write (the default; the
runner uses it for the terminal status) also fsyncs the file before the rename and the folder after
it; the runner's stage changes skip that (two fsyncs cost 5–15 ms on a typical disk, per write), so a
power cut may lose the latest stage change but never leaves a torn manifest.

The runner's terminal writes come in batches (`finisher.py`): their manifests are prepared and
published without a sync, and `Fsyncs` syncs the batch's files (then their folders) side by side,
where the disk merges the cache flushes that one-by-one fsyncs would pay each.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import enum
import functools
import itertools
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
HEARTBEAT_NAME = ".heartbeat"
#: Numbers the temporary files of this process (itertools.count is thread-safe in CPython).
_TMP_COUNTER = itertools.count()
#: At most this many fsyncs at once (`Fsyncs`); a batch of terminal writes holds one per job
#: ending, at most the launcher's concurrency, so 8 covers the usual batch in one round.
SYNC_WORKERS = 8
_sync_pool: ThreadPoolExecutor | None = None
_sync_pool_lock = threading.Lock()
#: File systems that live in memory: nothing on them outlives the machine, fsync has nothing to do.
MEMORY_FILE_SYSTEMS = frozenset({"tmpfs", "ramfs"})


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    return str(value)


class ManifestWriter:
    """Writes one job's manifest, at most once per `min_interval` seconds unless forced.

    Callers force a write at every stage change and terminal status; the periodic, unforced ones
    are throttled. A durable call blocks on disk I/O (fsync): from a coroutine, run it in a thread.
    """

    def __init__(self, run_dir: Path, *, min_interval: float = 30.0) -> None:
        self.run_dir = Path(run_dir)
        self._dir = os.fspath(run_dir)  # temporary names are joined as strings (one per write)
        self.path = self.run_dir / MANIFEST_NAME
        self.heartbeat_path = self.run_dir / HEARTBEAT_NAME
        self.min_interval = min_interval
        self._last_write: float | None = None
        self._lock = threading.Lock()
        #: Whether the runs folder's file system keeps what fsync makes durable (not tmpfs): the
        #: group commit skips the batched fsyncs, and their thread hand-offs, where it does not.
        self.syncs = keeps_data(self.run_dir.parent)

    def update(self, doc: Mapping[str, Any], *, force: bool = False, durable: bool = True) -> bool:
        """Write `doc` as the manifest (sorted keys); False if throttled and nothing was written.

        `durable=False` skips the fsyncs: still atomic for readers, not guaranteed to survive a
        crash of the machine."""
        with self._lock:
            now = time.monotonic()
            if not force and self._last_write is not None and now - self._last_write < self.min_interval:
                return False
            self._publish(self._prepare(doc, durable=durable), durable=durable)
            self._last_write = now
            return True

    def prepare(self, doc: Mapping[str, Any], *, sync: bool = True) -> str:
        """The slow half of a durable write, done ahead: `doc` in a fsynced temporary file, not yet
        the manifest. Then `publish()` it (a rename, so readers see it at once) or `discard()` it.
        The runner prepares the terminal manifest before the terminal status write and publishes it
        after: a reader never sees a terminal manifest before the database has it, and hardly ever
        the other way round. `sync=False`: the caller fsyncs the returned file itself before it
        publishes it (`Fsyncs`, a batch at a time)."""
        return self._prepare(doc, durable=sync)

    def publish(self, tmp_name: str, *, sync_dir: bool = True) -> None:
        """Renames a prepared file over the manifest, then fsyncs the folder so the rename lasts;
        `sync_dir=False`: the caller fsyncs `run_dir` itself (`Fsyncs`)."""
        with self._lock:
            self._publish(tmp_name, durable=sync_dir)
            self._last_write = time.monotonic()

    def discard(self, tmp_name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)

    def touch_heartbeat(self) -> None:
        """Create `.heartbeat` or set its modification time to now."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.heartbeat_path.touch(exist_ok=True)

    def _mkstemp(self) -> tuple[int, str]:
        # A name of our own (pid and a counter) rather than tempfile's random one, which costs a
        # few random draws and checks per write; tempfile still settles a clash (a leftover).
        name = f"{self._dir}/.{MANIFEST_NAME}.{os.getpid()}.{next(_TMP_COUNTER)}.tmp"
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), name
        except FileExistsError:
            return tempfile.mkstemp(dir=self.run_dir, prefix=f".{MANIFEST_NAME}.", suffix=".tmp")

    def _prepare(self, doc: Mapping[str, Any], *, durable: bool) -> str:
        # Serialise first, so a document that cannot be encoded leaves no temporary file behind.
        # One line, no indent: `indent` forces json's pure-Python encoder, ~10x slower than the C
        # one, and a job writes its manifest several times (`jq .` reads it just as well).
        data = (json.dumps(doc, sort_keys=True, default=_json_default) + "\n").encode()
        # Same folder as the target: os.replace is atomic only within one file system. The folder
        # is made before the first write (a mkdir per write costs a lookup under the parent's lock).
        if self._last_write is None:
            os.makedirs(self.run_dir, exist_ok=True)
        try:
            fd, tmp_name = self._mkstemp()
        except FileNotFoundError:  # removed meanwhile (the first write prepared, not published)
            os.makedirs(self.run_dir, exist_ok=True)
            fd, tmp_name = self._mkstemp()
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
        except BaseException:
            self.discard(tmp_name)
            raise
        return tmp_name

    def _publish(self, tmp_name: str, *, durable: bool) -> None:
        try:
            os.replace(tmp_name, self.path)
        except BaseException:
            self.discard(tmp_name)
            raise
        if not durable:
            return
        # The rename itself is durable only once the folder is synced.
        _fsync_path(self._dir)


class OwedManifests:
    """Terminal manifests the disk refused (full, failing): written again, oldest first, until they
    land (`retry`, on each of the launcher's heartbeats). A job that ended changes its manifest no
    more, so its last document is the one owed; at most `LIMIT` are kept."""

    LIMIT = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owed: dict[ManifestWriter, Mapping[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._owed)

    def add(self, writer: ManifestWriter, doc: Mapping[str, Any]) -> None:
        with self._lock:
            if writer in self._owed or len(self._owed) < self.LIMIT:
                self._owed[writer] = doc

    def retry(self) -> int:
        """Writes what is owed, durably; stops at the first failure (the disk is still full, the
        others would fail too). Returns how many landed. Blocks on the disk: from a thread."""
        with self._lock:
            owed = list(self._owed.items())
        landed = 0
        for writer, doc in owed:
            try:
                writer.update(doc, force=True)
            except OSError:
                break
            with self._lock:
                if self._owed.get(writer) is doc:
                    del self._owed[writer]
            landed += 1
        return landed


def _fsync_path(path: str) -> None:
    # Read-only is enough: fsync flushes the inode whatever the descriptor's mode, folders too.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pool() -> ThreadPoolExecutor:
    global _sync_pool
    with _sync_pool_lock:
        if _sync_pool is None:
            _sync_pool = ThreadPoolExecutor(max_workers=SYNC_WORKERS, thread_name_prefix="manifest-fsync")
        return _sync_pool


class Fsyncs:
    """fsyncs of files or folders, started at once in worker threads, side by side: concurrent
    fsyncs share the disk's cache flushes, where one after the other each waits for its own (on
    the development VM, 8 files in 0.8 ms against 2.3). The caller goes on with other work
    meanwhile, then waits for them: `wait()` in a thread, `await wait_async()` on the event loop.
    Both return the paths whose fsync failed, with the `OSError`, rather than raise it."""

    def __init__(self, paths: Sequence[str]) -> None:
        self._futures = [(path, _pool().submit(_fsync_path, path)) for path in paths]

    def wait(self) -> list[tuple[str, OSError]]:
        concurrent.futures.wait([future for _, future in self._futures])
        return self._failed()

    async def wait_async(self) -> list[tuple[str, OSError]]:
        if self._futures:
            await asyncio.wait([asyncio.wrap_future(future) for _, future in self._futures])
        return self._failed()

    def _failed(self) -> list[tuple[str, OSError]]:
        failed: list[tuple[str, OSError]] = []
        for path, future in self._futures:
            exc = future.exception()
            if isinstance(exc, OSError):
                failed.append((path, exc))
            elif exc is not None:
                raise exc
        return failed


def keeps_data(folder: Path) -> bool:
    """False when `folder` is on a file system that lives in memory (tmpfs, ramfs), where an fsync
    makes nothing durable. True otherwise, and whenever that cannot be told."""
    return _fs_type(os.fspath(folder)) not in MEMORY_FILE_SYSTEMS


@functools.lru_cache(maxsize=64)
def _fs_type(folder: str) -> str | None:
    # Once per folder: the runs folder is the same for every job of the process.
    mount = folder_mount(folder)
    return None if mount is None else mount[1]


def folder_mount(folder: str) -> tuple[str, str] | None:
    """(source, type) of the mount that holds `folder`, from `/proc/self/mounts`; None when that
    cannot be read."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
            mounts = fh.read()
    except OSError:
        return None
    return mount_of(os.path.realpath(folder), mounts)


def mount_of(real_path: str, mounts: str) -> tuple[str, str] | None:
    """(source, type) of the mount that holds `real_path` (resolved), given the text of
    `/proc/self/mounts`: the longest mount point above it, the last mounted one where several
    share it. The standard library has no statfs; this table is what `findmnt` reads too."""
    best: tuple[int, str, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # The kernel writes spaces, tabs, newlines and backslashes in mount points as octal escapes.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = real_path == point or real_path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), fields[0], fields[2])
    return None if best is None else (best[1], best[2])
