"""A client command (`submit`, `jobs …`, `version`) loads no part of the server: the database
layer, the catalog, the web framework. They were imported by every command at start-up and made
`codex-runner version` take a second (half a second of it SQLAlchemy and the runtime); a CI job or
chat bot that calls the CLI per job pays that each time."""

from __future__ import annotations

import subprocess
import sys

import pytest

#: What only the server and the operations commands need.
SERVER_ONLY = (
    "sqlalchemy",
    "alembic",
    "psycopg",
    "fastapi",
    "uvicorn",
    "prometheus_client",
    "codex_runner.runtime",
    "codex_runner.store",
    "codex_runner.catalog",
    "codex_runner.launcher",
    "codex_runner.api",
)

PROBE = """
import sys
sys.argv = ["codex-runner", *sys.argv[1:]]
from codex_runner.cli import main
try:
    main()
except SystemExit:
    pass
loaded = [m for m in {modules!r} if m in sys.modules]
sys.stderr.write("LOADED=" + ",".join(loaded) + "\\n")
"""


@pytest.mark.parametrize(
    "argv",
    [["version"], ["jobs", "list", "--help"], ["submit", "--help"], ["jobs", "logs", "--help"]],
    ids=" ".join,
)
def test_a_client_command_loads_no_server_module(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(modules=SERVER_ONLY), *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("LOADED=")]
    assert lines, done.stderr
    assert lines[-1] == "LOADED=", f"{argv}: {lines[-1]}"
    assert done.stdout.strip()  # the command did run: a version or a help text


def test_an_operations_command_still_finds_what_it_imports_late() -> None:
    """`doctor`, `cleanup`, `backup`, `restore` import the database layer inside the command now:
    their help and their start must still work (their behaviour is tested in tests/integration)."""
    for command in ("doctor", "cleanup", "backup", "restore"):
        done = subprocess.run(
            [sys.executable, "-m", "codex_runner", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and "Usage" in done.stdout, (command, done.stderr)
