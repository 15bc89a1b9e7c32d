"""Runs the operations commands as a real process: the `codex-runner` console script once cli.py
registers them, until then a minimal typer app made by `codex_runner.cli_ops.register`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

CONSOLE_SCRIPT = Path(sys.executable).with_name("codex-runner")
_TINY_APP = (
    "import sys, typer\n"
    "from codex_runner.cli_ops import register\n"
    "app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)\n"
    "register(app)\n"
    "app(prog_name='codex-runner')\n"
)


def _registered() -> bool:
    from codex_runner.cli import app

    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    return "doctor" in names and CONSOLE_SCRIPT.exists()


def run_cli(
    args: list[str], env: Mapping[str, str], cwd: Path, timeout: float = 120, wrapper: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """`wrapper` comes before the command on its command line (`unshare …`)."""
    argv = [str(CONSOLE_SCRIPT), *args] if _registered() else [sys.executable, "-c", _TINY_APP, *args]
    argv = [*wrapper, *argv]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    full_env.update(env)
    return subprocess.run(
        argv, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
