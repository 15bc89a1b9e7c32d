"""Checkpoint index of a log's redacted stream, so that reading a page costs O(page).

One file per log and redaction version, ``<index_dir>/<log name>.<version>.idx``: a header (magic,
version, rule-set fingerprint) and fixed-size records (raw offset, redacted offset, rule state)
taken at hard piece boundaries about every ``CHECKPOINT_EVERY`` raw bytes. It grows by appending as
the log grows, and is rebuilt from scratch when missing, torn, of another rule set, or stale (the
log is shorter than what it indexes). Updates are serialised by an exclusive ``flock`` on the log;
lookups take no lock, as records are only ever appended and a rebuild replaces the file atomically.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from codex_runner.logs.redaction import RuleSet
from codex_runner.logs.stream import redact_range

CHECKPOINT_EVERY = 64 * 1024
_MAGIC = b"CRLOGIX1"
_HEADER = struct.Struct("<8s8s16s")
_RECORD = struct.Struct("<QQI")
_APPEND_BATCH = 1024


@dataclass(frozen=True, slots=True)
class Checkpoint:
    raw: int
    redacted: int
    state: int


#: The log's start: where a read begins without an index.
START = Checkpoint(0, 0, 0)


def index_path(index_dir: Path, log_path: Path, version: str) -> Path:
    return index_dir / f"{log_path.name}.{version}.idx"


class CheckpointIndex:
    def __init__(self, path: Path, ruleset: RuleSet) -> None:
        self.path = path
        self.ruleset = ruleset
        self._header = _HEADER.pack(_MAGIC, ruleset.version.encode(), ruleset.fingerprint)

    def update(self, log: BinaryIO, size: int, until: int | None = None) -> Checkpoint:
        """Indexes the hard pieces of ``log[:size]`` not indexed yet (O(new bytes)); returns the
        last checkpoint. With ``until`` (a redacted offset), stops at the first checkpoint past it:
        a page near the start of a long log that was never read costs O(page), not a pass over the
        whole log; the index grows further as later pages are asked for."""
        fcntl.flock(log.fileno(), fcntl.LOCK_EX)
        try:
            last = self._last_valid(size)
            if last is None:
                self._rebuild()
                last = START
            pending: list[bytes] = []
            redacted = last.redacted
            for chunk in redact_range(
                log, self.ruleset, raw_start=last.raw, raw_end=size, state=last.state, final=False
            ):
                redacted += len(chunk.text)
                if chunk.raw_end - last.raw >= CHECKPOINT_EVERY:
                    last = Checkpoint(chunk.raw_end, redacted, chunk.state)
                    pending.append(_RECORD.pack(last.raw, last.redacted, last.state))
                    if len(pending) >= _APPEND_BATCH:
                        self._append(pending)
                        pending = []
                    if until is not None and last.redacted > until:
                        break
            self._append(pending)
            return last
        finally:
            fcntl.flock(log.fileno(), fcntl.LOCK_UN)

    def locate(self, redacted_offset: int) -> Checkpoint:
        """The last checkpoint at or before ``redacted_offset`` (binary search, no full read)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return START
        try:
            count = (os.fstat(fd).st_size - _HEADER.size) // _RECORD.size
            low, high = 0, count - 1
            best = START
            while low <= high:
                middle = (low + high) // 2
                record = _read_record(fd, middle)
                if record.redacted <= redacted_offset:
                    best, low = record, middle + 1
                else:
                    high = middle - 1
            return best
        finally:
            os.close(fd)

    def _last_valid(self, size: int) -> Checkpoint | None:
        """The last record if the file is usable for a log of ``size`` bytes; drops a torn tail."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            length = os.fstat(fd).st_size
            if length < _HEADER.size + _RECORD.size or os.pread(fd, _HEADER.size, 0) != self._header:
                return None
            count = (length - _HEADER.size) // _RECORD.size
            if length != _HEADER.size + count * _RECORD.size:
                os.ftruncate(fd, _HEADER.size + count * _RECORD.size)
            last = _read_record(fd, count - 1)
            return None if last.raw > size else last
        finally:
            os.close(fd)

    def _rebuild(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_bytes(self._header + _RECORD.pack(START.raw, START.redacted, START.state))
        os.replace(temporary, self.path)

    def _append(self, records: list[bytes]) -> None:
        if records:
            with self.path.open("ab") as index:
                index.write(b"".join(records))


def _read_record(fd: int, number: int) -> Checkpoint:
    raw, redacted, state = _RECORD.unpack(os.pread(fd, _RECORD.size, _HEADER.size + number * _RECORD.size))
    return Checkpoint(raw, redacted, state)
