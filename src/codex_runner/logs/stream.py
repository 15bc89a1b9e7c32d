"""Cuts a raw log into pieces and redacts them in order: the one definition of the redacted stream.

A piece is a line (ending with ``\\n``) of at most ``MAX_LINE`` bytes; a longer line is cut into
pieces of at most ``MAX_LINE`` bytes, each redacted on its own. From v2 on, a cut falls where the
rule set's matches, seen ``lookahead`` bytes past it, are not split (``RuleSet.cut_guard``), so a
piece is at most ``MAX_LINE - lookahead`` bytes. Cut points depend only on the bytes
from the piece's start, so every reader, starting from any piece boundary, sees the same pieces and
therefore the same redacted bytes at the same offsets. The last bytes of a log, with no newline yet
and shorter than ``MAX_LINE``, are a "soft" piece: it may still grow, so it is only redacted when the
log is final, and never ends a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from codex_runner.logs.redaction import RuleSet

MAX_LINE = 64 * 1024
BLOCK = 64 * 1024
# A long line is cut after a space, tab, comma or semicolon in its last ``_CUT_WINDOW`` bytes when it
# has one, so that tokens (and most secrets) stay whole on one side of the cut.
_CUT_WINDOW = 4096


@dataclass(frozen=True, slots=True)
class Chunk:
    """Redacted text of the raw bytes ``[raw_start, raw_end)``; ``state`` is the rule state after
    them; ``hard``: ends at a piece boundary that can never move (a newline or a cut)."""

    raw_start: int
    raw_end: int
    text: bytes
    state: int
    hard: bool


def redact_range(
    log: BinaryIO, ruleset: RuleSet, *, raw_start: int, raw_end: int, state: int, final: bool
) -> Iterator[Chunk]:
    """Redacts ``[raw_start, raw_end)`` of ``log`` from a piece boundary with the rule state there,
    in chunks of about ``BLOCK`` bytes. Without ``final`` a trailing soft piece is held back."""
    log.seek(raw_start)
    buf, base, eof = b"", raw_start, False
    while True:
        while not eof and len(buf) < BLOCK + MAX_LINE:
            data = log.read(min(BLOCK + MAX_LINE, raw_end - base - len(buf)))
            eof = not data
            buf += data
        if not buf:
            return
        pos = 0
        while pos < BLOCK:
            newline = buf.rfind(b"\n", pos, pos + MAX_LINE)
            if newline < 0:
                break
            pos = newline + 1
        hard = True
        if not pos:
            if len(buf) > MAX_LINE:  # the byte after the cut must be known: the cut never moves
                pos = _cut(buf, ruleset)
            elif final:
                pos, hard = len(buf), False
            else:
                return
        text, state = ruleset.redact(buf[:pos], state)
        yield Chunk(base, base + pos, text, state, hard)
        buf, base = buf[pos:], base + pos


def _cut(buf: bytes, ruleset: RuleSet) -> int:
    """Where a line of more than ``MAX_LINE`` bytes starting at ``buf[0]`` is cut. It depends on
    ``buf[:MAX_LINE]`` only (known whenever a cut is made), so it never moves."""
    guard = ruleset.cut_guard
    if guard is None:
        return separator_cut(buf, MAX_LINE)
    target = MAX_LINE - guard.lookahead
    cut = separator_cut(buf, target)
    # The rules see ``lookahead`` bytes past any cut: enough to recognise a match that spans it.
    low = target - _CUT_WINDOW - guard.lookback
    safe = cut - low
    for start, end in reversed(ruleset.spans(buf[low:MAX_LINE])):
        if start < safe < end:
            safe = start  # the match goes whole into the next piece
    if safe <= 0:
        # A match reaches back past the window (over ``lookback`` bytes long): no cut here keeps
        # it whole, so keep the separator cut.
        return cut
    return _char_start(buf, low + safe)


def separator_cut(buf: bytes, end: int) -> int:
    """After the last separator of the window before ``end`` (not a space right after ``:`` or
    ``=``, which would part a key from its value), else at ``end``; never before a UTF-8
    continuation byte. ``buf`` goes on past ``end``. Also the log writer's cut at its cap."""
    floor = max(end - _CUT_WINDOW, 0)
    cut = max(buf.rfind(sep, floor, end) for sep in (b",", b";"))
    space = max(buf.rfind(sep, floor, end) for sep in (b" ", b"\t"))
    while space > floor and buf[space - 1 : space] in (b":", b"="):
        space = max(buf.rfind(sep, floor, space) for sep in (b" ", b"\t"))
    cut = max(cut, space) + 1 if max(cut, space) >= floor else end
    return _char_start(buf, cut)


def _char_start(buf: bytes, cut: int) -> int:
    for _ in range(3):
        if cut > 0 and 0x80 <= buf[cut] < 0xC0:
            cut -= 1
    return cut
