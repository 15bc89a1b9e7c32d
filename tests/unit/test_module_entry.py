"""`python -m codex_runner` is the `codex-runner` command (a venv whose scripts are not on PATH)."""

from __future__ import annotations

import subprocess
import sys


def test_python_dash_m_runs_the_command() -> None:
    got = subprocess.run(
        [sys.executable, "-m", "codex_runner", "--help"], capture_output=True, text=True, timeout=60
    )
    assert got.returncode == 0, got.stderr
    assert "serve" in got.stdout and "submit" in got.stdout, got.stdout
