"""The inotify watch that lets an untouched spare be taken without an lstat of every file: any change
anywhere in its work tree, made after the watch began, makes it "touched"; only a watched, verified,
untouched folder with the same inode is trusted."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from codex_runner.execution import spare_watch
from codex_runner.execution.spare_watch import SpareWatch

pytestmark = pytest.mark.timeout(60)


def tree(root: Path) -> Path:
    for name in ("a/b/c.txt", "a/d.txt", "e.txt", ".git/index", ".git/HEAD"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    return root


def watched(tmp_path: Path) -> tuple[SpareWatch, Path]:
    w = SpareWatch()
    root = tree(tmp_path / "spare")
    assert w.start(root)
    w.verified(root)
    return w, root


def test_an_untouched_spare_is_trusted_once_and_survives_renames(tmp_path: Path) -> None:
    w, root = watched(tmp_path)
    (root / "a/b/c.txt").read_text()  # reading is not a change
    os.rename(root, tmp_path / "ready")  # the runner publishes, then a job claims: same folder
    os.rename(tmp_path / "ready", tmp_path / "job")
    assert w.take(tmp_path / "job")
    assert not w.take(tmp_path / "job")  # taken means no longer watched


def append(path: Path) -> None:
    with path.open("a") as f:
        f.write("x")


CHANGES: dict[str, Callable[[Path], object]] = {
    "modify": lambda r: (r / "a/b/c.txt").write_text("planted"),
    "append": lambda r: append(r / "e.txt"),
    "truncate": lambda r: os.truncate(r / "a/d.txt", 0),
    "chmod": lambda r: (r / "e.txt").chmod(0o755),
    "touch": lambda r: os.utime(r / "a/d.txt", (0, 0)),
    "delete": lambda r: (r / "a/b/c.txt").unlink(),
    "new file deep": lambda r: (r / "a/b/new.txt").write_text("x"),
    "new folder": lambda r: (r / "a/new").mkdir(),
    "rename folder": lambda r: os.rename(r / "a/b", r / "a/z"),
    "move out": lambda r: os.rename(r / "a/d.txt", r.parent / "d.txt"),
    "symlink": lambda r: (r / "link").symlink_to("/etc/passwd"),
    "remove folder": lambda r: [(r / "a/b/c.txt").unlink(), (r / "a/b").rmdir()],
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_change_makes_the_spare_touched(tmp_path: Path, change: str) -> None:
    w, root = watched(tmp_path)
    CHANGES[change](root)
    assert not w.take(root)


def test_a_folder_made_while_watching_is_watched_too(tmp_path: Path) -> None:
    """A new folder is itself a change; what matters is that nothing in the tree escapes."""
    w = SpareWatch()
    root = tree(tmp_path / "spare")
    assert w.start(root)
    (root / "a/late").mkdir()
    w.verified(root)
    assert not w.take(root)


def test_the_git_link_and_folder_are_not_watched(tmp_path: Path) -> None:
    """`.git` is checked or rewritten on take (spares.py); `git worktree repair` rewrites the link."""
    w, root = watched(tmp_path)
    (root / ".git/index").write_text("rewritten by the checkout")
    (root / ".git/config").write_text("[core]\n")
    assert w.take(root)
    w2, root2 = watched(tmp_path / "two")
    (root2 / ".git/index").unlink()
    (root2 / ".git/HEAD").unlink()
    (root2 / ".git").rmdir()
    (root2 / ".git").write_text("gitdir: /somewhere\n")  # a worktree's link file
    assert w2.take(root2)
    # Only at the root: a `.git` anywhere else is part of the tree.
    w3, root3 = watched(tmp_path / "three")
    (root3 / "a/.git").write_text("x")
    assert not w3.take(root3)


def test_not_verified_forgotten_or_unknown_is_not_trusted(tmp_path: Path) -> None:
    w = SpareWatch()
    root = tree(tmp_path / "spare")
    assert w.start(root)
    assert not w.take(root)  # the build's checks never passed
    w2, root2 = watched(tmp_path / "two")
    w2.forget(root2)
    assert not w2.take(root2)
    assert not SpareWatch().take(root2)  # another process (or a restart): never watched
    assert not w2.take(tmp_path / "missing")


def test_a_folder_swapped_in_under_the_spare_name_is_not_trusted(tmp_path: Path) -> None:
    w, root = watched(tmp_path)
    os.rename(root, tmp_path / "elsewhere")
    tree(root)  # the same files, another folder
    assert not w.take(root)


def test_one_spare_changed_leaves_another_trusted(tmp_path: Path) -> None:
    w = SpareWatch()
    one, two = tree(tmp_path / "one"), tree(tmp_path / "two")
    for root in (one, two):
        assert w.start(root)
        w.verified(root)
    (one / "e.txt").write_text("planted")
    assert not w.take(one)
    assert w.take(two)


def test_a_lost_event_queue_makes_every_spare_touched(tmp_path: Path) -> None:
    """More events than the kernel queues (`fs.inotify.max_queued_events`) between two reads: what
    was lost cannot be known, so no watched spare is trusted."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    w = SpareWatch()
    quiet, busy = tree(tmp_path / "quiet"), tree(tmp_path / "busy")
    for root in (quiet, busy):
        assert w.start(root)
        w.verified(root)
    # Each rename queues two events (MOVED_FROM, MOVED_TO) that the kernel cannot merge.
    for i in range(limit // 2 + 10):
        os.rename(busy / ("e.txt" if i % 2 == 0 else "f.txt"), busy / ("f.txt" if i % 2 == 0 else "e.txt"))
    assert not w.take(quiet)
    assert not w.take(busy)


def test_a_tree_with_too_many_folders_is_not_watched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spare_watch, "MAX_FOLDERS", 2)
    w = SpareWatch()
    root = tree(tmp_path / "spare")  # root, a, a/b: three folders
    assert not w.start(root)
    w.verified(root)
    assert not w.take(root)


def test_a_queue_lost_before_a_spare_was_watched_does_not_touch_it(tmp_path: Path) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    w = SpareWatch()
    old, new = tree(tmp_path / "old"), tree(tmp_path / "new")
    assert w.start(old)
    for i in range(limit // 2 + 10):
        os.rename(old / ("e.txt" if i % 2 == 0 else "f.txt"), old / ("f.txt" if i % 2 == 0 else "e.txt"))
    assert w.start(new)
    w.verified(new)
    assert w.take(new)


def test_a_deleted_spare_is_forgotten(tmp_path: Path) -> None:
    w, root = watched(tmp_path)
    shutil.rmtree(root)
    w.forget(tmp_path)  # any call reads the queue
    assert not w._spares and not w._by_wd  # nothing kept for a folder that is gone


def test_all_spares_together_stay_within_a_share_of_the_users_watches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cap was per tree only: sixteen spares of a big repo took most of the user's
    `max_user_watches`, and the agents' own file watchers (the same user) failed with ENOSPC. Past
    the budget, a spare is not watched (it is checked file by file when taken); the budget comes
    back as spares are taken."""
    monkeypatch.setattr(spare_watch.Path, "read_text", lambda self: "20")  # a quarter: 5 watches
    assert spare_watch.watch_budget() == 5
    w = SpareWatch()
    first, second = tree(tmp_path / "one"), tree(tmp_path / "two")  # 3 folders each, .git aside
    assert w.start(first)
    assert not w.start(second)  # 3 + 3 > 5
    w.verified(first)
    assert w.take(first)  # its watches are given back
    assert w.start(second)
