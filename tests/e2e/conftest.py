"""Fixtures for tests against the real codex binary: the binary itself (skipped with a reason when
absent, a failure in CI), a git workspace, and a home folder for codex."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.e2e.codex_harness import find_codex


@pytest.fixture(scope="session")
def codex_bin() -> str:
    path, reason = find_codex()
    if path is None:
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: a missing codex is a failure)")
        pytest.skip(reason)
    return path


@pytest.fixture
def git_workspace(tmp_path: Path) -> Path:
    """A git repository with one commit: codex refuses to run outside a git repository."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    git = ["git", "-C", str(workspace), "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True, timeout=30)
    (workspace / "README.md").write_text("# demo\n")
    subprocess.run([*git, "add", "README.md"], check=True, timeout=30)
    subprocess.run([*git, "commit", "-q", "-m", "initial"], check=True, timeout=30)
    return workspace


@pytest.fixture
def user_home(tmp_path: Path) -> Path:
    """HOME for codex, so that nothing of the real user's ~/.codex is read."""
    home = tmp_path / "home"
    home.mkdir()
    return home
