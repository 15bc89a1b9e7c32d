"""A workspace the cleanup cannot delete is reported, not called clean: `shutil.rmtree` ran with
`ignore_errors`, so a folder left behind (an immutable file, a mount) gave a cleanup `success`
while the workspace stayed on disk for good."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import unprivileged
from tests.integration.conftest import Runner

EXTRA = """
[scripts.stuck]
command = ["/bin/sh", "-c", "mkdir -p deep/er && touch deep/er/stuck && chattr +i deep/er/stuck"]

[scripts.locked]
command = ["/bin/sh", "-c", "mkdir -p d/e && touch d/e/f && chmod 000 d/e d"]
"""


def _stage(job: dict[str, object], name: str) -> dict[str, object]:
    return next(s for s in job["stages"] if s["name"] == name)  # type: ignore[attr-defined,index]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chattr") is None, reason="chattr +i needs root")
def test_a_file_the_cleanup_cannot_delete_fails_the_cleanup_stage_naming_it(
    runner_factory: Callable[..., Runner],
) -> None:
    runner = runner_factory(extra_toml=EXTRA)
    job = runner.wait(runner.submit({}, script="stuck")["id"])
    workspace = runner.runtime.settings.workspace_dir / job["id"]
    try:
        if not workspace.exists():  # chattr refused (a file system without the flag)
            pytest.skip("this file system has no immutable flag")
        assert job["status"] == "success", job  # the script's work stands; the cleanup is a stage
        cleanup = _stage(job, "cleanup")
        assert cleanup["status"] == "failed", cleanup
        assert "deep/er/stuck is left" in str(cleanup["error"]), cleanup
    finally:
        subprocess.run(["chattr", "-i", str(workspace / "deep" / "er" / "stuck")], check=False, timeout=30)


def test_a_folder_the_script_locked_is_opened_up_and_deleted(runner_factory: Callable[..., Runner]) -> None:
    runner = runner_factory(extra_toml=EXTRA)
    job = runner.wait(runner.submit({}, script="locked")["id"])
    assert job["status"] == "success", job
    assert _stage(job, "cleanup")["status"] == "success"
    assert not (runner.runtime.settings.workspace_dir / job["id"]).exists()


def test_folders_locked_one_in_another_are_deleted_without_root(tmp_path: Path) -> None:
    """Root opens a `chmod 000` folder anyway (CAP_DAC_OVERRIDE), so run as root the test above
    passed whatever the cleanup did; a runner of its own user opened `d` and then left it, with
    `d/e` locked inside, and failed the cleanup. The removal here runs without capabilities, as
    such a runner's does."""
    root = tmp_path / "workspaces"
    workspace = root / "job"
    (workspace / "d" / "e").mkdir(parents=True)
    (workspace / "d" / "e" / "f").touch()
    os.chmod(workspace / "d" / "e", 0)
    os.chmod(workspace / "d", 0)
    remove = (
        "import sys; from pathlib import Path; from codex_runner.execution.workspace_base import remove_tree; "
        "remove_tree(Path(sys.argv[1]), Path(sys.argv[2]))"
    )
    done = subprocess.run(
        [*unprivileged(), sys.executable, "-c", remove, str(workspace), str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not workspace.exists()
