"""Paged reading of a job's redacted log (SPEC §5): offsets are byte positions in the redacted
UTF-8 stream, pages never split a character, and offsets handed out never change.

Calls are synchronous and do file I/O: an async caller runs them in a worker thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from codex_runner.errors import InvalidRequest
from codex_runner.logs.index import START, CheckpointIndex, index_path
from codex_runner.logs.redaction import REDACTION_VERSION, get_ruleset
from codex_runner.logs.stream import redact_range

# A page may start up to 3 bytes past the asked offset (the rest of a character) and needs one more
# byte to know whether it ends on a character boundary.
_SLACK = 4


@dataclass(frozen=True, slots=True)
class LogPage:
    offset: int
    next_offset: int
    content: str
    is_complete: bool
    redaction_version: str


def read_page(
    log_path: Path,
    *,
    offset: int,
    limit: int,
    complete: bool,
    index_dir: Path,
    version: str = REDACTION_VERSION,
) -> LogPage:
    """At most ``limit`` bytes of the redacted log from ``offset`` (moved to the next character
    boundary if inside one). ``complete``: the job is terminal, so the log will not grow. While it
    may grow, a last line without its newline is held back until it has one or passes 64 KiB.
    A ``limit`` smaller than the character at ``offset`` gives an empty page at that offset."""
    if offset < 0 or limit < 1:
        raise InvalidRequest("offset must be >= 0 and limit >= 1")
    ruleset = get_ruleset(version)
    try:
        log = log_path.open("rb")
    except FileNotFoundError:
        return LogPage(offset, offset, "", complete, version)
    with log:
        size = os.fstat(log.fileno()).st_size
        index = CheckpointIndex(index_path(index_dir, log_path, version), ruleset)
        try:
            index.update(log, size, until=offset + limit + _SLACK)
            start = index.locate(offset)
        except OSError:
            # The index is a cache, made and grown by reads: on a disk it cannot be written to (a
            # full one) the read starts at the log's start, slower but not failed.
            start = START
        parts: list[bytes] = []
        redacted_end, at_end = start.redacted, True
        for chunk in redact_range(
            log, ruleset, raw_start=start.raw, raw_end=size, state=start.state, final=complete
        ):
            if redacted_end + len(chunk.text) > offset:
                parts.append(chunk.text)
            redacted_end += len(chunk.text)
            if redacted_end >= offset + limit + _SLACK:
                at_end = False
                break
    if offset >= redacted_end:
        return LogPage(offset, offset, "", complete and at_end, version)
    data = b"".join(parts)
    base = redacted_end - len(data)
    first = offset - base
    while first < len(data) and 0x80 <= data[first] < 0xC0:
        first += 1
    last = min(first + limit, len(data))
    while last < len(data) and last > first and 0x80 <= data[last] < 0xC0:
        last -= 1
    return LogPage(
        offset=base + first,
        next_offset=base + last,
        content=data[first:last].decode("utf-8"),
        is_complete=complete and at_end and last == len(data),
        redaction_version=version,
    )


def redacted_size(
    log_path: Path, *, complete: bool, index_dir: Path, version: str = REDACTION_VERSION
) -> int:
    """Size in bytes of the redacted log available now (what a reader could page to)."""
    ruleset = get_ruleset(version)
    try:
        log = log_path.open("rb")
    except FileNotFoundError:
        return 0
    with log:
        size = os.fstat(log.fileno()).st_size
        try:
            last = CheckpointIndex(index_path(index_dir, log_path, version), ruleset).update(log, size)
        except OSError:  # as in `read_page`
            last = START
        chunks = redact_range(
            log, ruleset, raw_start=last.raw, raw_end=size, state=last.state, final=complete
        )
        return last.redacted + sum(len(chunk.text) for chunk in chunks)
