"""Paged reading of real log files: offsets, character boundaries, held-back lines, the index."""

from __future__ import annotations

from pathlib import Path

import pytest

from codex_runner.errors import InvalidRequest
from codex_runner.logs.index import CHECKPOINT_EVERY, CheckpointIndex, index_path
from codex_runner.logs.reader import LogPage, read_page, redacted_size
from codex_runner.logs.redaction import V2
from codex_runner.logs.stream import MAX_LINE


def page(tmp_path: Path, offset: int, limit: int = 16384, complete: bool = True) -> LogPage:
    return read_page(
        tmp_path / "job.log", offset=offset, limit=limit, complete=complete, index_dir=tmp_path / "ix"
    )


def read_all(tmp_path: Path, limit: int, complete: bool = True, offset: int = 0) -> tuple[str, int]:
    parts = []
    while True:
        got = page(tmp_path, offset, limit, complete)
        assert got.offset == offset
        assert len(got.content.encode()) <= limit
        parts.append(got.content)
        if got.next_offset == offset:
            return "".join(parts), offset
        offset = got.next_offset


def write(tmp_path: Path, data: bytes, mode: str = "wb") -> None:
    with (tmp_path / "job.log").open(mode) as log:
        log.write(data)


def test_missing_log_is_empty(tmp_path: Path) -> None:
    assert page(tmp_path, 0) == LogPage(0, 0, "", True, "v4")
    assert page(tmp_path, 5, complete=False) == LogPage(5, 5, "", False, "v4")


def test_pages_redact_and_concatenate(tmp_path: Path) -> None:
    write(tmp_path, b"hello\npassword=hunter2 ok\n")
    expected = "hello\npassword=[REDACTED:secret_assignment] ok\n"
    for limit in (1, 2, 7, 100):
        assert read_all(tmp_path, limit) == (expected, len(expected))
    whole = page(tmp_path, 0)
    assert (whole.content, whole.is_complete, whole.redaction_version) == (expected, True, "v4")
    assert not page(tmp_path, 0, limit=5).is_complete


def test_offset_past_end(tmp_path: Path) -> None:
    write(tmp_path, b"abc\n")
    assert page(tmp_path, 100) == LogPage(100, 100, "", True, "v4")
    assert page(tmp_path, 4) == LogPage(4, 4, "", True, "v4")
    assert page(tmp_path, 100, complete=False) == LogPage(100, 100, "", False, "v4")


def test_offset_inside_a_character_moves_to_the_next(tmp_path: Path) -> None:
    write(tmp_path, "a€b\n".encode())  # € is 3 bytes at offsets 1..3
    assert page(tmp_path, 2) == LogPage(4, 6, "b\n", True, "v4")
    assert page(tmp_path, 1, limit=3).content == "€"


def test_limit_never_splits_a_character(tmp_path: Path) -> None:
    write(tmp_path, "€€\n".encode())
    assert page(tmp_path, 0, limit=4) == LogPage(0, 3, "€", False, "v4")
    # smaller than the character: an empty page at the same offset, never a cut character
    assert page(tmp_path, 0, limit=2) == LogPage(0, 0, "", False, "v4")
    assert page(tmp_path, 3, limit=1) == LogPage(3, 3, "", False, "v4")
    assert page(tmp_path, 6, limit=1) == LogPage(6, 7, "\n", True, "v4")


def test_partial_line_held_back_while_running(tmp_path: Path) -> None:
    write(tmp_path, b"done\npassword=hunt")
    assert page(tmp_path, 0, complete=False) == LogPage(0, 5, "done\n", False, "v4")
    write(tmp_path, b"er2\n", "ab")
    got = page(tmp_path, 5, complete=False)
    assert got.content == "password=[REDACTED:secret_assignment]\n"
    assert page(tmp_path, 0, complete=True).content == "done\npassword=[REDACTED:secret_assignment]\n"


def test_long_partial_line_released_past_64_kib(tmp_path: Path) -> None:
    write(tmp_path, b"x" * MAX_LINE)
    assert page(tmp_path, 0, complete=False).content == ""
    write(tmp_path, b"yy", "ab")
    first = page(tmp_path, 0, limit=131072, complete=False)
    # Released at 64 KiB, cut where the rules could still see 16 KiB past the cut (v2).
    assert V2.cut_guard is not None
    assert first.content == "x" * (MAX_LINE - V2.cut_guard.lookahead)
    write(tmp_path, b"z\n", "ab")
    assert read_all(tmp_path, 131072, complete=False) == ("x" * MAX_LINE + "yyz\n", MAX_LINE + 4)


def test_long_line_cut_at_a_separator(tmp_path: Path) -> None:
    word = b"abcdefghi,"  # 10 bytes: the cut falls after a comma, never inside a word
    write(tmp_path, word * 10000 + b"\n")
    text, end = read_all(tmp_path, 131072, complete=False)
    assert text == (word * 10000 + b"\n").decode()
    assert end == 100001


def test_index_built_incrementally_and_used(tmp_path: Path) -> None:
    line = b"0123456789 " * 9 + b"password=x\n"
    write(tmp_path, line * 3000)
    expected = (line.replace(b"password=x", b"password=[REDACTED:secret_assignment]") * 3000).decode()
    assert redacted_size(tmp_path / "job.log", complete=True, index_dir=tmp_path / "ix") == len(expected)
    path = index_path(tmp_path / "ix", tmp_path / "job.log", "v4")
    first_size = path.stat().st_size
    assert first_size > 64
    write(tmp_path, line * 3000, "ab")
    middle = len(expected) + 12345
    doubled = expected * 2
    assert page(tmp_path, middle, limit=100).content == doubled[middle : middle + 100]
    assert path.stat().st_size > first_size
    index = CheckpointIndex(path, V2)
    checkpoint = index.locate(middle)
    assert 0 < middle - checkpoint.redacted < 3 * CHECKPOINT_EVERY


def test_index_rebuilt_when_stale_missing_or_foreign(tmp_path: Path) -> None:
    write(tmp_path, b"a password=one\n" * 20000)
    assert page(tmp_path, 0, limit=20).content == "a password=[REDACTED"
    path = index_path(tmp_path / "ix", tmp_path / "job.log", "v4")
    write(tmp_path, b"short token=abc\n")  # replaced by a shorter log: the index is stale
    assert read_all(tmp_path, 7) == ("short token=[REDACTED:secret_assignment]\n", 41)
    path.write_bytes(b"garbage" * 10)  # not ours
    assert page(tmp_path, 6).content == "token=[REDACTED:secret_assignment]\n"
    path.unlink()
    assert page(tmp_path, 6).content == "token=[REDACTED:secret_assignment]\n"
    header = path.read_bytes()[:32]
    path.write_bytes(header[:8] + b"v0\0\0\0\0\0\0" + header[16:] + path.read_bytes()[32:])
    assert page(tmp_path, 6).content == "token=[REDACTED:secret_assignment]\n"
    assert path.read_bytes()[:32] == header


def test_torn_index_tail_is_dropped(tmp_path: Path) -> None:
    write(tmp_path, b"line of text\n" * 30000)
    page(tmp_path, 0)
    path = index_path(tmp_path / "ix", tmp_path / "job.log", "v4")
    with path.open("ab") as index:
        index.write(b"\x01\x02\x03")
    assert (
        page(tmp_path, 200000, limit=13).content
        == "line of text\n"[200000 % 13 :] + "line of text\n"[: 200000 % 13]
    )
    assert (path.stat().st_size - 32) % 20 == 0


def test_pem_block_spanning_checkpoints(tmp_path: Path) -> None:
    body = b"".join(b"MIIE%060d\n" % i for i in range(200))
    data = (
        b"x\n" * 40000 + b"-----BEGIN RSA PRIVATE KEY-----\n" + body + b"-----END RSA PRIVATE KEY-----\nend\n"
    )
    write(tmp_path, data)
    text, _ = read_all(tmp_path, 65536)
    assert text == "x\n" * 40000 + "[REDACTED:private_key]\nend\n"


def test_bad_arguments(tmp_path: Path) -> None:
    write(tmp_path, b"x\n")
    with pytest.raises(InvalidRequest):
        page(tmp_path, -1)
    with pytest.raises(InvalidRequest):
        page(tmp_path, 0, limit=0)
    with pytest.raises(InvalidRequest):
        read_page(tmp_path / "job.log", offset=0, limit=1, complete=True, index_dir=tmp_path, version="v9")


# (written, the secret that must never show): each spans a space, so a separator cut could split it.
CUT_SECRETS = [
    (b" Authorization: Bearer opaqueTokenValue123456789", b"opaqueTokenValue123456789"),
    (b" password = hunter2hunter2", b"hunter2hunter2"),
    (b' "token" : "hunter2 hunter2"', b"hunter2 hunter2"),
    (b" bearer QWERTYUIOPASDFGHJKLZXC", b"QWERTYUIOPASDFGHJKLZXC"),
    (
        b' {"k": "-----BEGIN PRIVATE KEY-----\\nMIIE0123456789\\nMIIE9876543210\\n-----END PRIVATE KEY-----"}',
        b"MIIE",
    ),
    (b" https://USER:PA55W0RD99@example.com/x", b"PA55W0RD99"),
]


@pytest.mark.parametrize(("written", "secret"), CUT_SECRETS)
def test_long_line_cut_never_splits_a_secret(tmp_path: Path, written: bytes, secret: bytes) -> None:
    """SPEC §5: no page shows a secret. v1 cut a line over 64 KiB after a space near its end, which
    could part `Bearer` from its token (or a key from its value) so neither piece matched a rule.
    The secret is slid across every cut position the separator rule could pick; pages read whole
    and while the line grows must all hide it."""
    guard = V2.cut_guard
    assert guard is not None
    target = MAX_LINE - guard.lookahead
    starts = [*range(target - len(written) - 8, target + 8), MAX_LINE - 100, MAX_LINE - 40]
    for start in starts:
        line = b"a" * start + written + b" " + b"b" * 5000 + b"\n"
        write(tmp_path, line)
        text, end = read_all(tmp_path, 131072)
        assert secret not in text.encode(), start
        assert text.encode() == V2.redact(line)[0], start  # the same as if it were never cut
        assert end == len(text.encode())
    # Offsets stay put while the line grows past the cut.
    line = b"a" * (target - 30) + CUT_SECRETS[0][0] + b" " + b"b" * 30000 + b"\n"
    write(tmp_path, b"")
    (tmp_path / "ix").mkdir(exist_ok=True)
    seen, offset = [], 0
    for size in (MAX_LINE - 1, MAX_LINE + 1, len(line)):
        write(tmp_path, line[:size])
        text, offset = read_all(tmp_path, 997, complete=False, offset=offset)
        seen.append(text)
    assert "".join(seen).encode() == V2.redact(line)[0]
    assert b"opaqueTokenValue" not in "".join(seen).encode()


def test_v1_keeps_its_cuts(tmp_path: Path) -> None:
    """A published version never changes its output: v1 still cuts after the last separator before
    64 KiB (and so still splits the secret above); v2 is the default."""
    line = b"a" * (MAX_LINE - 100) + CUT_SECRETS[0][0] + b"b" * 5000 + b"\n"
    write(tmp_path, line)
    v1 = read_page(
        tmp_path / "job.log", offset=0, limit=131072, complete=True, index_dir=tmp_path / "ix", version="v1"
    )
    assert v1.redaction_version == "v1" and "opaqueTokenValue" in v1.content
    assert page(tmp_path, 0, limit=131072).redaction_version == "v4"
    assert "opaqueTokenValue" not in page(tmp_path, 0, limit=131072).content


def test_a_first_page_near_the_start_does_not_index_the_whole_log(tmp_path: Path) -> None:
    """SPEC §5: a page costs O(page). The index was built to the end of the log on the first read
    of any page: 8 s for the first 100 bytes of a 256 MiB log. It now stops past the page asked
    for, and grows as later pages are read."""
    line = b"x" * 83 + b"\n"
    write(tmp_path, line * 100_000)  # 8.4 MB
    path = index_path(tmp_path / "ix", tmp_path / "job.log", "v4")
    assert page(tmp_path, 0, limit=100).content == (line * 2).decode()[:100]
    records = (path.stat().st_size - 32) // 20
    assert records <= 3, records  # the start record and one checkpoint past the page
    far = len(line) * 90_000 + 5
    assert page(tmp_path, far, limit=84).content == (line[5:] + line[:5]).decode()
    assert (path.stat().st_size - 32) // 20 > 30  # indexed on to the far page
    # Reading on from the start again uses what is indexed and stays exact.
    assert page(tmp_path, len(line) * 1000, limit=84).content == line.decode()
