"""The run manifest on a real file system: atomic replacement under concurrent readers, throttling."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from codex_runner.execution import manifest as manifest_module
from codex_runner.execution.manifest import ManifestWriter


def test_concurrent_reader_never_sees_a_partial_manifest(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "job-1"
    writer = ManifestWriter(run_dir)
    writer.update({"seq": -1, "pad": ""}, force=True)
    done = threading.Event()
    reads = 0
    seen: set[int] = set()
    failures: list[str] = []

    def reader() -> None:
        nonlocal reads
        # Keep reading while the writer runs, and at least a few thousand times in all.
        while not done.is_set() or reads < 3000:
            raw = writer.path.read_bytes()
            try:
                doc = json.loads(raw)
                assert doc["pad"] == "x" * len(doc["pad"])
                seen.add(doc["seq"])
            except (ValueError, KeyError, AssertionError) as exc:
                failures.append(f"{exc!r}: {raw[:80]!r}… ({len(raw)} bytes)")
            reads += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        # Sizes swing between tiny and large, so a torn write could not go unnoticed.
        for seq in range(400):
            assert writer.update({"seq": seq, "pad": "x" * ((seq * 7919) % 60000)}, force=True)
    finally:
        done.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert failures == []
    assert reads >= 3000
    assert len(seen) > 10  # the reader really raced the writer
    assert json.loads(writer.path.read_bytes())["seq"] == 399
    assert sorted(os.listdir(run_dir)) == ["manifest.json"]  # no temporary file left


def test_throttle_allows_one_write_per_interval_unless_forced(tmp_path: Path) -> None:
    writer = ManifestWriter(tmp_path, min_interval=0.3)
    assert writer.update({"n": 1})
    assert not writer.update({"n": 2})
    assert json.loads(writer.path.read_text())["n"] == 1
    assert writer.update({"n": 3, "stage": "commit"}, force=True)
    assert not writer.update({"n": 4})  # a forced write restarts the interval
    time.sleep(0.35)
    assert writer.update({"n": 5})
    assert json.loads(writer.path.read_text())["n"] == 5


def test_manifest_is_sorted_json_with_rfc3339_times(tmp_path: Path) -> None:
    writer = ManifestWriter(tmp_path / "run")
    when = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    writer.update({"status": "running", "job_id": "j", "started_at": when, "path": tmp_path}, force=True)
    text = writer.path.read_text()
    doc = json.loads(text)
    assert list(doc) == sorted(doc)
    assert doc["started_at"] == "2025-01-02T03:04:05+00:00"
    assert doc["path"] == str(tmp_path)


def test_unencodable_document_keeps_the_previous_manifest(tmp_path: Path) -> None:
    writer = ManifestWriter(tmp_path)
    writer.update({"status": "queued"}, force=True)
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(ValueError):
        writer.update(loop, force=True)
    assert json.loads(writer.path.read_text()) == {"status": "queued"}
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_touch_heartbeat_creates_then_refreshes(tmp_path: Path) -> None:
    writer = ManifestWriter(tmp_path / "runs" / "job-2")
    writer.touch_heartbeat()
    assert writer.heartbeat_path.exists()
    os.utime(writer.heartbeat_path, (1_000_000, 1_000_000))
    writer.touch_heartbeat()
    assert writer.heartbeat_path.stat().st_mtime > time.time() - 60


def test_fsyncs_sync_files_and_folders_side_by_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's fsyncs run at the same time (each waits here for all the others to start, which
    one-by-one fsyncs never would), and one that fails is reported without stopping the rest."""
    paths = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.tmp").write_text(name)
        paths.append(str(tmp_path / name / "manifest.tmp"))
    paths.append(str(tmp_path / "a"))  # a folder, as after the renames
    missing = str(tmp_path / "gone" / "manifest.tmp")
    together = threading.Barrier(len(paths), timeout=10)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        together.wait()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    failed = manifest_module.Fsyncs([*paths[:2], missing, *paths[2:]]).wait()
    assert sorted(synced) == sorted(paths)
    assert [(path, type(exc)) for path, exc in failed] == [(missing, FileNotFoundError)]
    assert manifest_module.Fsyncs([]).wait() == []


def test_a_prepared_manifest_left_unsynced_is_published_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`prepare(sync=False)` and `publish(sync_dir=False)` leave the fsyncs to the caller (the
    group commit's `Fsyncs`): the manifest reads the same, and nothing is synced meanwhile."""
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    writer = ManifestWriter(tmp_path / "runs" / "job-3")
    tmp_name = writer.prepare({"status": "success"}, sync=False)
    assert not writer.path.exists()
    writer.publish(tmp_name, sync_dir=False)
    assert json.loads(writer.path.read_text()) == {"status": "success"}
    assert synced == []
    # The default stays durable: the file before the rename, the folder after it.
    writer.publish(writer.prepare({"status": "failed"}))
    assert len(synced) == 2


def test_fsyncs_start_at_once_and_their_wait_waits_for_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group commit runs its transaction while the manifests sync: starting them does not wait,
    waiting does."""
    paths = []
    for name in ("a", "b"):
        (tmp_path / name).write_text(name)
        paths.append(str(tmp_path / name))
    release = threading.Event()
    synced: list[int] = []

    def slow_fsync(fd: int) -> None:
        assert release.wait(timeout=10)
        synced.append(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    syncing = manifest_module.Fsyncs(paths)
    assert synced == []  # started, none done: the caller goes on meanwhile
    release.set()
    assert syncing.wait() == []
    assert len(synced) == 2

    async def on_the_loop() -> list[tuple[str, OSError]]:
        release.clear()
        syncing = manifest_module.Fsyncs([*paths, str(tmp_path / "missing")])
        waiting = asyncio.ensure_future(syncing.wait_async())
        await asyncio.sleep(0.05)
        assert not waiting.done()  # the loop runs on while the fsyncs wait
        release.set()
        return await asyncio.wait_for(waiting, timeout=10)

    [(path, exc)] = asyncio.run(on_the_loop())
    assert path.endswith("missing") and isinstance(exc, FileNotFoundError)
    assert len(synced) == 4


MOUNTS = r"""/dev/vda / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
/dev/vdb /srv/runner\040data xfs rw 0 0
tmpfs /srv/runner\040data/cache tmpfs rw 0 0
/dev/vdc /mnt ext4 rw 0 0
tmpfs /mnt tmpfs rw 0 0
"""


@pytest.mark.parametrize(
    ("path", "fs_type"),
    [
        ("/", "ext4"),
        ("/var/lib/runner/runs", "ext4"),
        ("/dev/shm/runs", "tmpfs"),
        ("/dev/shmx/runs", "ext4"),  # a name that starts like a mount point is not under it
        ("/srv/runner data/runs", "xfs"),  # octal escapes in mount points
        ("/srv/runner data/cache/runs", "tmpfs"),  # the longest mount point wins
        ("/mnt/runs", "tmpfs"),  # mounted over: the last one wins
    ],
)
def test_mount_of_reads_the_mount_table(path: str, fs_type: str) -> None:
    mount = manifest_module.mount_of(path, MOUNTS)
    assert mount is not None and mount[1] == fs_type


def test_mount_of_names_the_source_too() -> None:
    assert manifest_module.mount_of("/srv/runner data/runs", MOUNTS) == ("/dev/vdb", "xfs")
    assert manifest_module.mount_of("/var/runs", MOUNTS) == ("/dev/vda", "ext4")
    assert manifest_module.mount_of("/var/runs", "") is None


def test_a_writer_on_tmpfs_does_not_ask_for_fsyncs() -> None:
    with open("/proc/self/mounts") as fh:
        mount = manifest_module.mount_of("/dev/shm", fh.read())
    shm = mount is not None and mount[1] == "tmpfs"
    if not shm or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable tmpfs at /dev/shm on this machine")
    assert not ManifestWriter(Path("/dev/shm") / "cr-runs" / "job-4").syncs
    assert manifest_module.keeps_data(Path("/dev/shm")) is False
    assert manifest_module.keeps_data(Path("/proc/no/such/folder")) is True  # proc: not in memory
