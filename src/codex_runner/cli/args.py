"""`--arg KEY=VALUE` parsing for `submit`.

VALUE is JSON when it parses as JSON (`n=3` is 3, `flag=true` is true, `name='"3"'` is the string
"3"), else the raw string; `@PATH` reads a file and `-` reads standard input, both verbatim.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from codex_runner.cli.common import CliError

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _no_constants(name: str) -> Any:
    # NaN and Infinity are not JSON: `x=NaN` stays the string "NaN".
    raise ValueError(name)


def _finite(text: str) -> float:
    # `1e400` parses as inf, which is not JSON either (the request could not be sent): a string.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def parse_value(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constants, parse_float=_finite)
    except ValueError:
        return text


def _read_stdin(stdin: TextIO, key: str) -> str:
    """All of standard input, verbatim: its bytes when it has them (a text stream translates line
    endings, and takes bytes that are not UTF-8 as lone surrogates, which cannot be sent)."""
    raw = getattr(stdin, "buffer", None)
    if raw is None:
        return stdin.read()
    try:
        return bytes(raw.read()).decode("utf-8")
    except UnicodeDecodeError:
        raise CliError(f"--arg {key}=-: standard input is not UTF-8 text") from None


def parse_args(items: Sequence[str], stdin: TextIO) -> dict[str, Any]:
    args: dict[str, Any] = {}
    stdin_used_by: str | None = None
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not _KEY.fullmatch(key):
            raise CliError(f"--arg {item[:80]!r}: expected KEY=VALUE with KEY a letter, digit or _ name")
        if key in args:
            raise CliError(f"--arg {key}: given twice")
        if raw.startswith("@"):
            path = Path(raw[1:]).expanduser()
            try:
                args[key] = path.read_bytes().decode("utf-8")  # bytes: line endings stay as they are
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
                raise CliError(f"--arg {key}=@{path}: cannot read the file ({reason})") from None
        elif raw == "-":
            if stdin_used_by is not None:
                raise CliError(f"--arg {key}=-: standard input is already read by --arg {stdin_used_by}")
            stdin_used_by = key
            args[key] = _read_stdin(stdin, key)
        else:
            args[key] = parse_value(raw)
    return args
