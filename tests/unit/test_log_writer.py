"""LogWriter on real files: known secrets never reach the disk, the cap holds, runner lines stand alone."""

from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import quote

from codex_runner.logs.redaction import REDACTION_VERSION, RULESETS
from codex_runner.logs.stream import MAX_LINE
from codex_runner.logs.writer import LogWriter

SECRET = "s3cr3t/Value+With=Chars"


def written(
    path: Path, chunks: list[bytes], *, max_bytes: int = 1 << 20, secrets: tuple[str, ...] = ()
) -> bytes:
    with LogWriter(path, max_bytes=max_bytes, known_secrets=secrets) as writer:
        for chunk in chunks:
            writer.write(chunk)
    return path.read_bytes()


def test_plain_output_passes_through(tmp_path: Path) -> None:
    assert (
        written(tmp_path / "a.log", [b"hello ", b"world\n", "é✓\n".encode()]) == "hello world\né✓\n".encode()
    )


def test_secret_split_across_every_boundary(tmp_path: Path) -> None:
    data = f"before {SECRET} after\n".encode()
    for cut in range(1, len(data)):
        for second in range(cut, len(data)):
            out = written(
                tmp_path / f"{cut}-{second}.log",
                [data[:cut], data[cut:second], data[second:]],
                secrets=(SECRET,),
            )
            assert out == b"before [REDACTED] after\n"


def test_secret_byte_by_byte(tmp_path: Path) -> None:
    data = f"{SECRET}{SECRET}x{SECRET}".encode()
    out = written(tmp_path / "b.log", [bytes([b]) for b in data], secrets=(SECRET,))
    assert out == b"[REDACTED][REDACTED]x[REDACTED]"


def test_encoded_forms_masked(tmp_path: Path) -> None:
    raw = SECRET.encode()
    forms = [
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        quote(SECRET, safe=""),
    ]
    data = " | ".join(forms).encode() + b"\n"
    out = written(tmp_path / "c.log", [data[:10], data[10:]], secrets=(SECRET,))
    assert out == b"[REDACTED] | [REDACTED] | [REDACTED]\n"


def test_short_values_untouched(tmp_path: Path) -> None:
    assert written(tmp_path / "d.log", [b"pass 1234567 ok\n"], secrets=("1234567",)) == b"pass 1234567 ok\n"


def test_longest_overlapping_secret_wins(tmp_path: Path) -> None:
    out = written(tmp_path / "e.log", [b"x password1", b"2 y\n"], secrets=("password1", "password12"))
    assert out == b"x [REDACTED] y\n"


def test_unfinished_secret_at_close_is_masked(tmp_path: Path) -> None:
    assert written(tmp_path / "f.log", [b"ok ", SECRET[:10].encode()], secrets=(SECRET,)) == b"ok [REDACTED]"
    assert (
        written(tmp_path / "g.log", [b"ok ", SECRET[:3].encode()], secrets=(SECRET,))
        == b"ok " + SECRET[:3].encode()
    )


def test_carry_stays_small_and_only_when_needed(tmp_path: Path) -> None:
    with LogWriter(tmp_path / "h.log", max_bytes=1 << 20, known_secrets=(SECRET,)) as writer:
        writer.write(b"no secret prefix here\n")
        assert (tmp_path / "h.log").read_bytes() == b"no secret prefix here\n"
        writer.write(b"tail " + SECRET[:5].encode())
        assert (tmp_path / "h.log").read_bytes() == b"no secret prefix here\ntail "


def test_cap_truncates_once_at_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "i.log"
    with LogWriter(path, max_bytes=50) as writer:
        for i in range(100):
            writer.write(b"line %03d\n" % i)
        assert writer.truncated
        writer.runner_line("exit code 0")
    data = path.read_bytes()
    assert data.count(b"log truncated") == 1
    # The unfinished line that would reach the cap is dropped whole (see the test below).
    assert data == b"".join(b"line %03d\n" % i for i in range(5)) + (
        b"[runner] log truncated at 45 bytes; further output dropped\n[runner] exit code 0\n"
    )


def test_cap_inside_a_long_line_keeps_characters_whole(tmp_path: Path) -> None:
    """A line longer than MAX_LINE (readers may have been served pieces of it) is cut at the cap
    when no separator comes before it, on a character boundary."""
    path = tmp_path / "j.log"
    with LogWriter(path, max_bytes=MAX_LINE + 9) as writer:
        writer.write("é".encode() * (MAX_LINE // 2 + 10))
        assert writer.bytes_written == len(path.read_bytes())
    data = path.read_bytes()
    assert data == "é".encode() * (MAX_LINE // 2 + 4) + (
        b"\n[runner] log truncated at %d bytes; further output dropped\n" % (MAX_LINE + 8)
    )


def test_runner_line_stands_alone(tmp_path: Path) -> None:
    path = tmp_path / "k.log"
    with LogWriter(path, max_bytes=1 << 20, known_secrets=(SECRET,)) as writer:
        writer.runner_line("start")
        writer.write(b"partial")
        writer.runner_line(f"two\nlines with {SECRET}")
        writer.write(b"next\n")
        assert writer.bytes_written == len(path.read_bytes())
    assert path.read_bytes() == (
        b"[runner] start\npartial\n[runner] two\n[runner] lines with [REDACTED]\nnext\n"
    )


def test_reopen_appends_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "l.log"
    written(path, [b"first\n"])
    with LogWriter(path, max_bytes=100) as writer:
        assert writer.bytes_written == 6
        writer.write(b"second\n")
        writer.flush()
    assert path.read_bytes() == b"first\nsecond\n"


def test_cap_prefers_the_last_line_end(tmp_path: Path) -> None:
    out = written(tmp_path / "m.log", [b"aaaa\nbbbb\ncccc\n"], max_bytes=12)
    assert out == b"aaaa\nbbbb\n[runner] log truncated at 10 bytes; further output dropped\n"


def test_a_runner_line_while_output_may_follow_never_splits_a_secret(tmp_path: Path) -> None:
    """The runner's "stopping the process group" line is written while the job's processes still
    run; a secret they are halfway through printing must be masked whole when they finish it."""
    secret = "sk-live-0123456789abcdefghijklmnopqrstuv"
    for split in (7, 12, 30):
        path = tmp_path / f"j{split}.log"
        with LogWriter(path, max_bytes=1 << 20, known_secrets=[secret]) as log:
            log.write(b"token=" + secret[:split].encode())
            log.runner_line("stopping the process group (timeout)", output_follows=True)
            log.write(secret[split:].encode() + b"\n")
        data = path.read_bytes()
        assert secret[:7].encode() not in data and secret[split:].encode() not in data, data
        assert data == b"token=[REDACTED]\n[runner] stopping the process group (timeout)\n"


def test_a_runner_line_waits_for_the_end_of_the_outputs_line(tmp_path: Path) -> None:
    """Put between two halves of a line, the runner line parted a secret the rules know by what
    comes before it (`GITHUB_TOKEN=`, `ghp_`) from its rest, which no rule knew on its own line:
    it waits for the output's line to end, or for the log to close."""
    token = "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    path = tmp_path / "w.log"
    with LogWriter(path, max_bytes=1 << 20) as log:
        log.write(b"GITHUB_TOKEN=" + token[:20].encode())
        log.runner_line("stopping the process group (timeout)", output_follows=True)
        log.write(token[20:].encode() + b" ok")
        log.runner_line("still stopping", output_follows=True)
        log.write(b"\nnext line\n")
        log.runner_line("exit code 143", output_follows=True)  # at a line start: at once
        log.write(b"unfinished")
        log.runner_line("late", output_follows=True)
    assert path.read_bytes() == (
        b"GITHUB_TOKEN=" + token.encode() + b" ok\n"
        b"[runner] stopping the process group (timeout)\n[runner] still stopping\n"
        b"next line\n[runner] exit code 143\nunfinished\n[runner] late\n"
    )
    redacted, _ = RULESETS[REDACTION_VERSION].redact(path.read_bytes(), 0)
    assert token[20:].encode() not in redacted and token[:12].encode() not in redacted


def test_the_cap_never_leaves_part_of_a_token_to_the_rules(tmp_path: Path) -> None:
    """Cut anywhere at the cap, `ghp_` and 26 characters ended the log: too few for the rule that
    knows tokens, so they showed. A short unfinished line is dropped whole (no reader can have
    had a piece of it); a line already longer than MAX_LINE is cut after a separator."""
    token = b"ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    path = tmp_path / "c.log"
    with LogWriter(path, max_bytes=3055) as log:
        log.write(b"x" * 3000 + b"\n")
        log.write(b'{"auth": "' + token + b'", "body": "' + b"a" * 500)
    data = path.read_bytes()
    assert data == b"x" * 3000 + b"\n[runner] log truncated at 3001 bytes; further output dropped\n"
    long = tmp_path / "l.log"
    with LogWriter(long, max_bytes=MAX_LINE + 3026) as log:  # the cap inside the token
        log.write(b"y" * (MAX_LINE + 3000) + b" ")
        log.write(b"auth " + token + b" more" * 50)
    data = long.read_bytes()
    assert data.endswith(
        b"y auth \n[runner] log truncated at %d bytes; further output dropped\n" % (MAX_LINE + 3006)
    )
    for piece in (token[:12], token[4:30]):
        assert piece not in data
    redacted, _ = RULESETS[REDACTION_VERSION].redact(data, 0)
    assert b"ghp_" not in redacted


def test_a_reopened_log_knows_where_its_last_line_starts(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    path.write_bytes(b"done\nhalf a li")
    with LogWriter(path, max_bytes=20) as log:
        log.write(b"ne that goes past the cap")
    assert path.read_bytes() == b"done\n[runner] log truncated at 5 bytes; further output dropped\n"


def test_a_secret_inside_a_longer_base64_value_is_masked(tmp_path: Path) -> None:
    """`Authorization: Basic base64("oauth2:" + token)` (curl -v), a docker `auth`: the token's
    bytes start at any of the three positions of a base64 group, with more bytes before and after."""
    token = "glpat-0123456789abcdefghij"
    path = tmp_path / "j.log"
    originals = []
    with LogWriter(path, max_bytes=1 << 20, known_secrets=[token]) as log:
        for prefix in (b"oauth2:", b"user:", b"u:", b""):
            for suffix in (b"", b"@host", b"!"):
                for encode in (base64.b64encode, base64.urlsafe_b64encode):
                    originals.append(encode(prefix + token.encode() + suffix))
                    log.write(b"auth " + originals[-1] + b"\n")
    lines = path.read_bytes().splitlines()
    assert len(lines) == len(originals)
    for line, original in zip(lines, originals, strict=True):
        left = line.split(b" ", 1)[1].replace(b"[REDACTED]", b"")
        # Every character that depends on the token's bytes alone is gone: at most one shared
        # with the prefix and one with the suffix are left of it.
        assert len(original) - len(left) >= 4 * len(token) // 3 - 2, (line, original)


def test_a_secret_with_bytes_that_are_not_utf8_is_masked(tmp_path: Path) -> None:
    """os.environ holds such bytes as lone surrogates (surrogateescape): encoding them raised, and
    the job's log could not even be created. The raw bytes, as the job prints them, are masked."""
    value = b"abcdefgh\xffxyz".decode("utf-8", "surrogateescape")
    path = tmp_path / "job.log"
    with LogWriter(path, max_bytes=1 << 20, known_secrets=[value, "\ud800" + "k" * 10]) as writer:
        writer.write(b"token abcdefgh\xffxyz and kkkkkkkkkk\n")
    assert path.read_bytes() == b"token [REDACTED] and kkkkkkkkkk\n"


def test_a_reopened_log_that_ends_mid_line_gets_its_runner_line_on_a_line_of_its_own(tmp_path: Path) -> None:
    """docs/logs.md: runner lines always stand on their own line, a reopened log's too."""
    path = tmp_path / "job.log"
    path.write_bytes(b"[runner] job j started\nbuilding step 3/7 ...")
    with LogWriter(path, max_bytes=1 << 20) as writer:
        writer.runner_line("job j started on r1 (attempt 2)")
    assert (
        path.read_bytes()
        == b"[runner] job j started\nbuilding step 3/7 ...\n[runner] job j started on r1 (attempt 2)\n"
    )
    with LogWriter(path, max_bytes=1 << 20) as writer:  # ends with a newline: nothing added
        writer.runner_line("again")
    assert path.read_bytes().endswith(b"(attempt 2)\n[runner] again\n")
