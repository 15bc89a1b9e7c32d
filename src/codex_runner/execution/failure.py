"""The `error_message` of a script that failed without saying why in any other way: its exit status
(or the signal that killed it) and the line of its standard error that tells what went wrong."""

from __future__ import annotations

import re
import signal as signals

MAX_LINE_CHARS = 500

# A line that reports the failure itself. Programs put more after it: clap (codex's option parser)
# ends with `Usage: ...` and `For more information, try '--help'.`, a TOML error with a caret under
# the bad column, so the last line alone said nothing (`script exited with code 2: For more
# information, try '--help'.`). Anchored at the start: a tracing line (`<time> ERROR codex_core::...`)
# is a log record of something codex went on from, not the reason it stopped.
_ERROR_LINE = re.compile(r"^(?:error|fatal)\b|panicked at", re.IGNORECASE)
# Lines that never say why a program failed: codex's start-up notice ("WARNING: proceeding, even
# though we could not create PATH aliases ...") is the only stderr of a codex killed by a signal.
_NOT_A_REASON = re.compile(r"^warning\b", re.IGNORECASE)


def telling_line(stderr: str) -> str | None:
    """The stderr line that best says why the program failed: the last line that reports an error
    (with the line after it when it ends in a colon, as `Error loading config.toml:` does), else
    the last line that is not a warning; None when there is none."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for index in range(len(lines) - 1, -1, -1):
        if _ERROR_LINE.search(lines[index]):
            line = lines[index]
            if line.endswith(":") and index + 1 < len(lines):
                line = f"{line} {lines[index + 1]}"
            return line[:MAX_LINE_CHARS]
    for line in reversed(lines):
        if not _NOT_A_REASON.match(line):
            return line[:MAX_LINE_CHARS]
    return None


def _signal_name(number: int) -> str:
    try:
        return signals.Signals(number).name
    except ValueError:
        return f"signal {number}"


def script_failure_message(exit_code: int, signal: int | None, stderr: str) -> str:
    """`script exited with code N: <line>`, or `script killed by SIGKILL (exit code 137): <line>`;
    `stderr` must be redacted already."""
    if signal is not None:
        head = f"script killed by {_signal_name(signal)} (exit code {exit_code})"
    else:
        head = f"script exited with code {exit_code}"
    line = telling_line(stderr)
    return f"{head}: {line}" if line else head
