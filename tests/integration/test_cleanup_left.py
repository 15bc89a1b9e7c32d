"""A workspace the cleanup cannot delete is reported, not called clean: `shutil.rmtree` ran with
`ignore_errors`, so a folder left behind (an immutable file, a mount) gave a cleanup `success`
while the workspace stayed on disk for good."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

import pytest

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
