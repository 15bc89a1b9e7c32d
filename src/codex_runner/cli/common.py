"""What every command shares: the two consoles, exit codes, the one-line error type, settings.

stdout carries data only (tables, JSON, ids, tokens, logs) so that it can be piped or captured;
everything meant for a person (progress, confirmations, errors) goes to stderr.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from enum import IntEnum
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from codex_runner.config import Settings, folder_problem, load_settings
from codex_runner.secrets import mask

# Piped output has no terminal width; rich would then wrap tables at 80 columns and split ids.
_PIPE_WIDTH = 240

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False)
if not out.is_terminal:
    out.width = _PIPE_WIDTH


class ExitCode(IntEnum):
    """Documented in docs/cli.md; scripts rely on them."""

    OK = 0
    JOB_FAILED = 1
    ERROR = 2  # usage, configuration, connection or API error (click uses 2 for usage errors too)
    JOB_TIMEOUT = 3
    JOB_CANCELED = 4
    WAIT_TIMEOUT = 5  # --wait-timeout passed while the job was still active
    INTERRUPTED = 130
    OUTPUT_CLOSED = 141  # standard output closed early (`| head`), as a shell reports SIGPIPE


class CliError(Exception):
    """A failure the user can act on: printed as one `error: …` line, never a traceback."""

    def __init__(self, message: str, *, code: str | None = None, exit_code: int = ExitCode.ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.exit_code = exit_code

    def reason(self) -> str:
        """The message with its code: what went wrong, fit for a line that goes on (a retry)."""
        return self.message + (f" ({self.code})" if self.code else "")

    def line(self) -> str:
        return f"error: {self.reason()}"


# Secrets of the loaded settings, so that an unexpected error's text can be masked before printing.
_known_secrets: list[str] = []
# And the settings themselves, so that an error about the data folder can name the setting.
_loaded: list[Settings] = []


def settings() -> Settings:
    """Loads and validates the settings once per command; `ConfigError` becomes the error line."""
    loaded = load_settings()
    _known_secrets[:] = loaded.secret_values()
    _loaded[:] = [loaded]
    return loaded


def masked(text: str) -> str:
    return mask(text, _known_secrets)


def failure_line(exc: Exception) -> str:
    """The one `error:` line of an exception no command handles by type, masked. A data folder
    that cannot be made or written (a file in its way, a read-only mount) is the commonest of
    them: the line names the path and the setting, not `unexpected FileExistsError: [Errno 17]`.
    So is a database that does not answer: its line names `RUNNER_DATABASE_URL`."""
    if isinstance(exc, OSError) and exc.filename:
        path = Path(os.fsdecode(exc.filename))
        hint = ""
        if any(path.is_relative_to(d) or d.is_relative_to(path) for d in (s.data_dir for s in _loaded)):
            hint = "; check RUNNER_DATA_DIR (`codex-runner doctor` checks its folders)"
        return masked(f"error: cannot use {path}: {folder_problem(exc)}{hint}")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import InterfaceError, OperationalError

    if isinstance(exc, OperationalError | InterfaceError):
        # The driver's first line names host, port and cause; never the URL or its password.
        cause = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
        if isinstance(exc.orig, sqlite3.Error):
            # A file, not a server: another user's, or a folder in its place.
            files = [make_url(s.database_url).database for s in _loaded] or ["the SQLite file"]
            return masked(
                f"error: cannot use the database {files[0]}: {cause}; check that this user can "
                "read and write it and its folder (RUNNER_DATA_DIR, or the path in "
                "RUNNER_DATABASE_URL; `codex-runner doctor`)"
            )
        return masked(
            f"error: cannot use the database: {cause}; check that it runs and that "
            "RUNNER_DATABASE_URL names it (`codex-runner doctor`)"
        )
    # The first line only (SQL errors append the statement).
    first = (str(exc).strip().splitlines() or [""])[0]
    return masked(f"error: unexpected {type(exc).__name__}" + (f": {first}" if first else ""))


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    """A line for a person, on stderr; `message` is plain text, never rich markup."""
    err.print(Text(message))


def cell(value: object) -> Text:
    """Text of data for the terminal (a table cell, a job's error or stderr tail): rich must not
    read `[...]` in it as markup, and its control characters (an escape sequence a script printed)
    are written as `\\xNN`, lines and tabs kept."""
    text = "" if value is None else str(value)
    return Text("".join(c if c in "\n\t" or c.isprintable() else f"\\x{ord(c):02x}" for c in text))


class TrimmedTable(Table):
    """A table whose lines end at their last character: rich pads every cell to its column's
    width, the last column's too, which leaves blanks at the end of most lines (a `diff` or a
    `grep ' $'` of the output trips on them)."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        parts = super().__rich_console__(console, options)
        segments = (s for p in parts for s in ([p] if isinstance(p, Segment) else console.render(p, options)))
        for line in Segment.split_lines(segments):
            while line and not line[-1].control and not line[-1].text.rstrip(" "):
                line.pop()
            if line and not line[-1].control:
                last = line[-1]
                line[-1] = Segment(last.text.rstrip(" "), last.style, last.control)
            yield from line
            yield Segment.line()


def data_table(*headers: str) -> Table:
    """A borderless table whose lines carry no trailing blanks, easy to read and to grep."""
    return TrimmedTable(*headers, box=None, pad_edge=False, header_style="bold")


STATUS_STYLES = {
    "queued": "cyan",
    "running": "yellow",
    "cancel_requested": "yellow",
    "success": "green",
    "failed": "red",
    "timeout": "red",
    "canceled": "magenta",
}


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


def format_duration(ms: int | float | None) -> str:
    if ms is None:
        return ""
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
