"""The error_message of a failed script: the stderr line that says why, not whatever came last."""

from __future__ import annotations

import signal

import pytest

from codex_runner.execution.failure import script_failure_message, telling_line

CLAP = """\
error: unexpected argument '--full-auto' found

  tip: to pass '--full-auto' as a value, use '-- --full-auto'

Usage: codex exec [OPTIONS] [PROMPT]

For more information, try '--help'.
"""

# codex 0.169 with a broken config.toml (an operator's own file).
TOML_ERROR = """\
Error loading config.toml:
/srv/codex-home/config.toml:1:10: unclosed array, expected `]`
  |
1 | model = [
  |          ^
"""


@pytest.mark.parametrize(
    ("stderr", "expected"),
    [
        (CLAP, "error: unexpected argument '--full-auto' found"),
        (
            TOML_ERROR,
            "Error loading config.toml: /srv/codex-home/config.toml:1:10: unclosed array, expected `]`",
        ),
        (
            "WARNING: proceeding, even though we could not create PATH aliases: x\n"
            'Error finding codex home: CODEX_HOME points to "/nope", but that path does not exist\n',
            'Error finding codex home: CODEX_HOME points to "/nope", but that path does not exist',
        ),
        # Tracing records are what codex went on from; the last plain line says why it stopped.
        (
            "2026-12-03T08:47:00Z ERROR codex_core::tools::router: error=patch rejected\n"
            "Not inside a trusted directory and --skip-git-repo-check was not specified.\n",
            "Not inside a trusted directory and --skip-git-repo-check was not specified.",
        ),
        (
            "thread 'main' panicked at src/main.rs:3:5:\nboom\nnote: run with RUST_BACKTRACE=1\n",
            "thread 'main' panicked at src/main.rs:3:5: boom",
        ),
        ('Traceback (most recent call last):\n  File "x", line 1\nValueError: bad\n', "ValueError: bad"),
        ("fatal: not a git repository\n", "fatal: not a git repository"),
        ("WARNING: proceeding, even though we could not create PATH aliases\n", None),
        ("", None),
        ("\n  \n", None),
    ],
)
def test_telling_line(stderr: str, expected: str | None) -> None:
    assert telling_line(stderr) == expected


def test_a_long_line_is_cut() -> None:
    line = telling_line("error: " + "x" * 2000)
    assert line is not None and len(line) == 500


def test_messages() -> None:
    assert (
        script_failure_message(2, None, CLAP)
        == "script exited with code 2: error: unexpected argument '--full-auto' found"
    )
    assert script_failure_message(3, None, "") == "script exited with code 3"
    assert (
        script_failure_message(137, signal.SIGKILL, "WARNING: x\n")
        == "script killed by SIGKILL (exit code 137)"
    )
    assert (
        script_failure_message(139, signal.SIGSEGV, "fatal: boom\n")
        == "script killed by SIGSEGV (exit code 139): fatal: boom"
    )
    assert script_failure_message(128 + 77, 77, "") == "script killed by signal 77 (exit code 205)"
