"""The raw log file of one job (SPEC §5): merged output plus ``[runner]`` lines, known secrets
replaced before anything reaches the disk, capped at ``max_bytes``."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from codex_runner.logs.stream import MAX_LINE, separator_cut
from codex_runner.secrets import replace_spans, secret_bytes, secret_forms, union_spans

REDACTED = b"[REDACTED]"
_MIN_SECRET = 8
_CONTINUATION = range(0x80, 0xC0)
#: How much a masked span that may still grow (secrets overlapping into output not yet read) may
#: hold back; past it the span is written masked as it stands, so memory stays bounded.
_MAX_HELD_SPAN = 64 * 1024


class LogWriter:
    """Writes through to the file (one ``os.write`` per call at most), so readers see output at
    once. Only a tail that could be the start of a secret form, shorter than the longest form, is
    held in memory until the next write decides it."""

    def __init__(self, path: Path, *, max_bytes: int, known_secrets: Sequence[str] = ()) -> None:
        forms = {secret_bytes(form) for value in known_secrets for form in secret_forms(value, _MIN_SECRET)}
        self._forms = sorted(forms, key=len, reverse=True)
        # Longest first: at one position the longest form wins, as with successive replaces.
        self._pattern = re.compile(b"|".join(re.escape(form) for form in self._forms)) if forms else None
        self._keep = max((len(form) for form in self._forms), default=1) - 1
        self._max_bytes = max_bytes
        self._carry = b""
        self._at_line_start = True
        # Where the file's last line starts (after its last newline), None if that is more than
        # MAX_LINE back; and runner lines waiting for the job's output to end its line.
        self._line_start: int | None = 0
        self._held_lines = b""
        self._truncated = False
        self._lock = threading.Lock()
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC  # RDWR: the last byte is read back
        try:
            self._fd: int | None = os.open(path, flags, 0o600)
        except FileNotFoundError:  # the first log of this folder (a mkdir each time costs a lookup)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, flags, 0o600)
        # A reopened log keeps its bytes, and they count toward the cap; a runner line after them
        # starts a line of its own if they end mid-line.
        self._written = os.fstat(self._fd).st_size
        if self._written:
            back = min(self._written, MAX_LINE + 1)
            last = os.pread(self._fd, back, self._written - back).rfind(b"\n")
            self._at_line_start = last == back - 1
            self._line_start = self._written - back + last + 1 if last >= 0 or back == self._written else None

    @property
    def bytes_written(self) -> int:
        return self._written

    @property
    def closed(self) -> bool:
        return self._fd is None

    @property
    def truncated(self) -> bool:
        return self._truncated

    def write(self, data: bytes) -> None:
        """A chunk of the job's output, cut anywhere (even inside a character or a secret)."""
        with self._lock:
            if self._truncated or not data:
                return
            masked = self._mask(self._carry + data)
            if self._held_lines:
                # Runner lines wait for the end of the output's line (see `runner_line`).
                end = masked.find(b"\n") + 1
                if end:
                    self._emit(masked[:end])
                    self._write(self._held_lines)
                    self._held_lines = b""
                    masked = masked[end:] if not self._truncated else b""
            self._emit(masked)

    def runner_line(self, text: str, *, output_follows: bool = False) -> None:
        """``[runner] <text>`` on lines of its own; written even past the cap (the runner's few
        status lines matter most when the output was cut). With `output_follows` (the job's
        processes still run), the held-back tail stays held: the next output may complete the
        secret it starts, and released now, the rest of that secret would reach the file unmasked.
        Those few bytes then come after the runner line instead of before it. And when the output
        is in the middle of a line, the runner line waits for that line's end (or `close`): put
        in between, it would part a secret the rules know by what comes before it (`KEY=…`, a
        token's prefix) from its rest, which would show unmasked on the next line."""
        body = text.encode("utf-8", "replace")
        if self._pattern is not None:
            body = replace_spans(body, union_spans(self._pattern, body), REDACTED)
        lines = b"".join(b"[runner] " + line + b"\n" for line in body.splitlines() or [b""])
        with self._lock:
            if output_follows and not self._at_line_start and not self._truncated:
                self._held_lines += lines
                return
            if not output_follows:
                pending = self._release_carry()
                if pending and not self._truncated:
                    self._emit(pending)
            self._write_runner_lines(self._held_lines + lines)
            self._held_lines = b""

    def flush(self) -> None:
        """Makes what was written durable (fsync); the held-back tail stays in memory."""
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)

    def close(self) -> None:
        """Writes the held tail and closes the file; closed even when that write fails (a full
        disk), which then raises."""
        with self._lock:
            if self._fd is None:
                return
            try:
                pending = self._release_carry()
                if pending and not self._truncated:
                    self._emit(pending)
                if self._held_lines:
                    self._write_runner_lines(self._held_lines)
                    self._held_lines = b""
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def _mask(self, buf: bytes) -> bytes:
        """Replaces the forms found in ``buf`` and keeps back, in ``_carry``, the shortest tail that
        could still become a form once more bytes arrive."""
        if self._pattern is None:
            self._carry = b""
            return buf
        decided = len(buf) - self._keep  # a form starting before this is wholly inside buf
        spans = union_spans(self._pattern, buf, decided) if any(form in buf for form in self._forms) else []
        held_span = None
        if spans and self._may_grow(buf, spans[-1], decided) and len(buf) - spans[-1][0] <= _MAX_HELD_SPAN:
            # A secret overlapping the last span runs past the end of buf: the span is not
            # finished, so it is held whole (and masked whole once it is).
            held_span = spans.pop()[0]
        pos = spans[-1][1] if spans else 0
        hold = held_span if held_span is not None else self._undecided_from(buf, max(pos, decided))
        self._carry = buf[hold:]
        return replace_spans(buf[:hold], spans, REDACTED)  # every span ends at or before `hold`

    def _may_grow(self, buf: bytes, span: list[int], decided: int) -> bool:
        """Whether a form starting inside `span` (at or after `decided`) is cut off by the end of
        `buf`: more output could make it a match that extends the span."""
        for at in range(max(span[0], decided), span[1]):
            rest = buf[at:]
            if any(len(form) > len(rest) and form.startswith(rest) for form in self._forms):
                return True
        return False

    def _undecided_from(self, buf: bytes, start: int) -> int:
        """The first position at or after ``start`` where a form could begin given what follows."""
        hold = len(buf)
        for form in self._forms:
            at = buf.find(form[:1], start, hold)
            while at >= 0:
                if form.startswith(buf[at : at + len(form)]):
                    hold = at
                    break
                at = buf.find(form[:1], at + 1, hold)
        return hold

    def _release_carry(self) -> bytes:
        """The held tail, when no more output will extend it (end, or a runner line in between):
        whole forms are replaced, and so is an unfinished one of 8 bytes or more."""
        pending, self._carry = self._carry, b""
        if not pending or self._pattern is None:
            return pending
        pending = replace_spans(pending, union_spans(self._pattern, pending), REDACTED)
        hold = self._undecided_from(pending, 0)
        tail = pending[hold:]
        return pending[:hold] + (REDACTED if len(tail) >= _MIN_SECRET else tail)

    def _write_runner_lines(self, lines: bytes) -> None:
        self._write(b"" if self._at_line_start else b"\n")
        self._write(lines)

    def _emit(self, data: bytes) -> None:
        """Writes job output under the cap; the first byte past it truncates the log for good.

        Cut where no secret is parted from what makes the rules know it: after the last line end
        in the room left; else, when no reader can have been served any of the unfinished line
        (the log is redacted in pieces of whole lines, a line over MAX_LINE bytes cut into more:
        see logs/stream.py), the file goes back to that line's start, the line dropped whole;
        else, inside a line already that long, after a separator as the stream cuts long lines
        (`separator_cut`): cut anywhere, `…ghp_` and the first 26 characters of a token would
        end the log, too few for the rule that knows tokens."""
        room = max(self._max_bytes - self._written, 0)
        if len(data) <= room:
            self._write(data)
            return
        cut = data.rfind(b"\n", 0, room) + 1
        if not cut:
            start = self._line_start
            if start is not None and self._written + room - start <= MAX_LINE:
                assert self._fd is not None
                os.ftruncate(self._fd, start)
                self._written, self._at_line_start = start, True
            else:
                cut = separator_cut(data, room)
                while cut > 0 and data[cut] in _CONTINUATION:
                    cut -= 1
        self._write(data[:cut])
        self._truncated = True
        self._carry = b""
        notice = f"[runner] log truncated at {self._written} bytes; further output dropped\n".encode()
        self._write((b"" if self._at_line_start else b"\n") + notice + self._held_lines)
        self._held_lines = b""

    def _write(self, data: bytes) -> None:
        if not data:
            return
        if self._fd is None:
            raise ValueError("write to a closed LogWriter")
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, view[done:])
        finally:
            # A full disk takes part of a write before it fails: that part is in the file, so it
            # counts (the size, the cap, where lines start, whether a runner line needs a newline).
            self._count(data[:done] if done < len(data) else data)
            if 0 < done < len(data):
                self._drop_cut_line()

    def _drop_cut_line(self) -> None:
        """After a write that failed part way: the line it cut goes, as at the cap (`_emit`) and
        for the same reason (the rest of a secret the rules know by its start is lost), when no
        reader can have had any of it. Shortening the file frees space: it cannot fail for want."""
        start = self._line_start
        if self._at_line_start or start is None or self._written - start > MAX_LINE:
            return
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, start)
        except OSError:
            return
        self._written, self._at_line_start = start, True

    def _count(self, data: bytes) -> None:
        if not data:
            return
        last = data.rfind(b"\n")
        if last >= 0:
            self._line_start = self._written + last + 1
        elif self._line_start is not None and self._written + len(data) - self._line_start > MAX_LINE:
            self._line_start = None  # long enough that readers may have had pieces of it
        self._written += len(data)
        self._at_line_start = data.endswith(b"\n")
