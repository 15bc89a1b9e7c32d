"""`real_dir`: the runner's own folders resolved once per process (an lstat per path component
saved on every job), relative paths still resolved against the working folder each time."""

from __future__ import annotations

from pathlib import Path

import pytest

from codex_runner.execution.gitutil import real_dir


def test_a_symlinked_folder_resolves_to_its_target_and_is_remembered(tmp_path: Path) -> None:
    target = tmp_path / "disk" / "data"
    target.mkdir(parents=True)
    link = tmp_path / "data"
    link.symlink_to(target)
    assert real_dir(link) == target.resolve()
    link.unlink()
    link.symlink_to(tmp_path)  # swapped while running: the answer given at first use stands
    assert real_dir(link) == target.resolve()


def test_a_relative_folder_follows_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    monkeypatch.chdir(tmp_path / "one")
    assert real_dir(Path("data")) == (tmp_path / "one").resolve() / "data"
    monkeypatch.chdir(tmp_path / "two")
    assert real_dir(Path("data")) == (tmp_path / "two").resolve() / "data"
