"""Property tests of the log library: random logs, random secrets, random page sizes and growth."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codex_runner.logs.reader import read_page
from codex_runner.logs.redaction import RULESETS, V1, V2
from codex_runner.logs.stream import MAX_LINE
from codex_runner.logs.writer import LogWriter
from codex_runner.secrets import secret_forms

SECRETS = [
    "sk-proj-Ab3dEf6hIj9kLmN0pQrStUvWxYz12345",
    "sk-ant-api03-QWERTYUIOP0123456789ASDF",
    "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
    "glpat-ZXCVBNM0123456789ZXCV",
    "xoxb-1234567890-ABCDEFGHIJ",
    "AKIAIOSFODNN7EXAMPLE",
    "AIzaSyA1234567890ABCDEFGHIJKLMNOPQRSTUV",
    "ya29.A0AFH6SMB0123456789QWERTY",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.DOZJGNRYP4J3JVMNHL0W5N",
]
# (text as written, the secret part that must never show)
SHAPES = [(s, s) for s in SECRETS] + [
    ("password=HUNTER22XY", "HUNTER22XY"),
    ('"api_key": "K3Y K3Y K3Y K3Y"', "K3Y K3Y K3Y K3Y"),
    ("https://USER:PA55W0RD99@example.com", "USER:PA55W0RD99"),
    ("Authorization: Bearer TOK3N.T0K3N.TOK3N", "TOK3N.T0K3N.TOK3N"),
    (
        "-----BEGIN PRIVATE KEY-----\nMIIEBODY0123456789\nQQQQ9999QQQQ9999\n-----END PRIVATE KEY-----",
        "MIIEBODY0123456789",
    ),
]
# Filler cannot spell any 8 bytes of a secret: no upper case, no digits.
filler = st.text(alphabet=st.sampled_from([*"abcdefgh ijk\n\n", "é", "€", "日", "😀"]), max_size=80)
pieces = st.one_of(filler, st.sampled_from(range(len(SHAPES))))
logs = st.lists(pieces, max_size=30)
SEPARATORS = [" ", "\n", "\t"]


def build(parts: list[str | int], seps: list[int]) -> tuple[bytes, list[str]]:
    out, secrets = [], []
    for i, part in enumerate(parts):
        if isinstance(part, int):
            text, secret = SHAPES[part]
            sep = SEPARATORS[seps[i % len(seps)] if seps else 0]
            out.append(f"{sep}{text}{sep}")
            secrets.append(secret)
        else:
            out.append(part)
    return "".join(out).encode(), secrets


def reference(raw: bytes) -> bytes:
    return V1.redact(raw)[0]


def assert_no_secret(text: bytes, secrets: list[str]) -> None:
    for secret in secrets:
        raw = secret.encode()
        for i in range(max(1, len(raw) - 7)):
            assert raw[i : i + 8] not in text, secret


def follow(log: Path, index: Path, offset: int, limit: int, complete: bool) -> tuple[bytes, int]:
    """Reads pages from ``offset`` until no progress; an empty page before the end can only be a
    limit smaller than the next character: retried with 4 bytes, as a client would."""
    parts = []
    while True:
        page = read_page(log, offset=offset, limit=limit, complete=complete, index_dir=index)
        content = page.content.encode()
        assert len(content) <= limit
        assert page.offset == offset  # offsets we hand out are always on a boundary
        if not content:
            retry = read_page(log, offset=offset, limit=4, complete=complete, index_dir=index)
            if not retry.content:
                return b"".join(parts), offset
            assert limit < len(retry.content.encode())
            page, content = retry, retry.content.encode()
        parts.append(content)
        offset = page.next_offset


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs, st.lists(st.integers(0, 2), max_size=5), st.integers(1, 131072) | st.integers(1, 64))
def test_pages_concatenate_to_the_redacted_log(parts: list[str | int], seps: list[int], limit: int) -> None:
    raw, secrets = build(parts, seps)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "job.log"
        log.write_bytes(raw)
        text, end = follow(log, Path(tmp) / "ix", 0, limit, complete=True)
    assert text == reference(raw)
    assert end == len(text)
    text.decode("utf-8")
    assert_no_secret(text, secrets)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    logs,
    st.lists(st.integers(0, 2), max_size=5),
    st.lists(st.integers(1, 400), min_size=1, max_size=20),
    st.integers(1, 131072) | st.integers(1, 32),
)
def test_offsets_survive_growth(parts: list[str | int], seps: list[int], cuts: list[int], limit: int) -> None:
    raw, secrets = build(parts, seps)
    with tempfile.TemporaryDirectory() as tmp:
        seen = follow_growing(Path(tmp) / "job.log", Path(tmp) / "ix", raw, cuts, limit)
    assert seen == reference(raw)
    assert_no_secret(seen, secrets)


def follow_growing(log: Path, index: Path, raw: bytes, cuts: list[int], limit: int) -> bytes:
    """What a reader following `log` sees while `raw` is appended in pieces of `cuts` bytes, then
    the rest, once the job has ended."""
    log.write_bytes(b"")
    seen, offset, pos = [], 0, 0
    for size in cuts:
        with log.open("ab") as out:
            out.write(raw[pos : pos + size])
        pos += size
        text, offset = follow(log, index, offset, limit, complete=False)
        seen.append(text)
    with log.open("ab") as out:
        out.write(raw[pos:])
    text, _ = follow(log, index, offset, limit, complete=True)
    seen.append(text)
    return b"".join(seen)


@settings(max_examples=300, deadline=None)
@given(logs, st.lists(st.integers(0, 2), max_size=5), st.lists(st.integers(0, 10_000), max_size=6))
def test_redaction_ignores_how_lines_are_grouped(
    parts: list[str | int], seps: list[int], cuts: list[int]
) -> None:
    raw, _ = build(parts, seps)
    lines = raw.splitlines(keepends=True)
    bounds = sorted({min(c, len(lines)) for c in cuts} | {0, len(lines)})
    out, state = [], 0
    for a, b in itertools.pairwise(bounds):
        text, state = V1.redact(b"".join(lines[a:b]), state)
        out.append(text)
    assert b"".join(out) == reference(raw)


FRAGMENTS = st.sampled_from(
    [
        "token",
        "Token=",
        "password: ",
        "'",
        '"',
        "\\",
        "sk-",
        "ghp_",
        "://",
        "@",
        ":",
        "AKIA",
        "eyJ",
        "bearer ",
        "Authorization: Basic ",
        "secret_key=",
        "api-key",
        "xoxb-",
        "xapp-",
        "xoxe.",
        "xoxp-",
        "https://outlook.office.com/webhook/",
        "ya29.",
        "AIza",
        "glpat-",
        "=",
        " ",
        "é",
    ]
)
line_text = st.lists(FRAGMENTS | st.text(alphabet="abcXYZ0189_-./", max_size=25), max_size=25).map("".join)


@settings(max_examples=600, deadline=None)
@given(line_text, st.sampled_from(sorted(RULESETS)))
def test_prefilter_equals_the_full_rule_set(text: str, version: str) -> None:
    rules = RULESETS[version]
    full = rules._regex(frozenset(range(len(rules.rules))))
    line = text.encode() + b"\n"
    assert rules.redact(line)[0] == full.sub(rules._mask, line)


@settings(max_examples=200, deadline=None)
@given(logs, st.lists(st.integers(1, 50), max_size=30))
def test_writer_masks_known_secrets_however_cut(parts: list[str | int], cuts: list[int]) -> None:
    raw, _ = build(parts, [0])
    known = [SECRETS[0], SECRETS[2], "HUNTER22XY"]
    with tempfile.TemporaryDirectory() as tmp:
        whole, pieces = Path(tmp) / "whole.log", Path(tmp) / "pieces.log"
        with LogWriter(whole, max_bytes=1 << 20, known_secrets=known) as writer:
            writer.write(raw)
        with LogWriter(pieces, max_bytes=1 << 20, known_secrets=known) as writer:
            pos = 0
            for size in cuts:
                writer.write(raw[pos : pos + size])
                pos += size
            writer.write(raw[pos:])
        assert pieces.read_bytes() == whole.read_bytes()
        assert_no_secret(whole.read_bytes(), known)


# Long lines: filler with separators, secrets placed anywhere, often around where a cut may fall.
long_filler = st.builds(
    lambda char, sep, n: ((char * 7 + sep) * n)[:n],
    st.sampled_from("abk"),
    st.sampled_from(
        ["", " ", ",", ";", "\t"]
    ),  # "": a run of letters, where the cut must take a separator in the secret
    # often ending just before a place where a cut may fall (v1: 64 KiB; v2: 16 KiB earlier)
    st.integers(0, 70000)
    | st.builds(int.__sub__, st.sampled_from([MAX_LINE, MAX_LINE - 16 * 1024]), st.integers(1, 80)),
)
long_line = st.lists(st.tuples(long_filler, st.sampled_from(range(len(SHAPES) - 1))), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(long_line, st.integers(2000, 131072), st.lists(st.integers(1, 90000), min_size=1, max_size=4))
def test_long_lines_never_show_a_secret(parts: list[tuple[str, int]], limit: int, growth: list[int]) -> None:
    """However a line over 64 KiB is cut (v2), no secret is split across pieces: pages read whole or
    while the log grows show none, and agree with each other."""
    line = " ".join(filler + " " + SHAPES[shape][0] for filler, shape in parts).encode() + b" tail\n"
    secrets = [SHAPES[shape][1] for _, shape in parts]
    with tempfile.TemporaryDirectory() as tmp:
        log, index = Path(tmp) / "job.log", Path(tmp) / "ix"
        log.write_bytes(line)
        whole, _ = follow(log, index, 0, limit, complete=True)
        assert_no_secret(whole, secrets)
        if len(line) <= MAX_LINE:
            assert whole == V2.redact(line)[0]
        seen = follow_growing(Path(tmp) / "grown.log", Path(tmp) / "ix2", line, growth, limit)
    assert seen == whole


# Known secrets that overlap one another: a suffix of one is a prefix of another.
OVERLAPPING = ["AAAAAAAABBBB", "BBBBCCCCCCCCCCCCCCCC", "CCCCDDDDDDDD", "QQQQRRRRSSSS"]


def _union_reference(data: bytes, forms: list[bytes]) -> bytes:
    """Every occurrence of every form, overlapping ones merged into one masked span."""
    spans: list[list[int]] = []
    for form in forms:
        at = data.find(form)
        while at >= 0:
            spans.append([at, at + len(form)])
            at = data.find(form, at + 1)
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out, pos = [], 0
    for start, end in merged:
        out += [data[pos:start], b"[REDACTED]"]
        pos = end
    masked = b"".join([*out, data[pos:]])
    # At the end of the output, an unfinished form of 8 bytes or more is masked too (by design).
    for at in range(len(masked)):
        rest = masked[at:]
        if any(len(form) > len(rest) and form.startswith(rest) for form in forms):
            return masked[:at] + (b"[REDACTED]" if len(rest) >= 8 else rest)
    return masked


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parts=st.lists(
        st.one_of(
            st.sampled_from(["AAAAAAAABBBBCCCCCCCCCCCCCCCC", "BBBBCCCCCCCCCCCCCCCCDDDDDDDD", *OVERLAPPING]),
            st.sampled_from(["AAAA", "BBBB", "CCCC", "x", " ", "\n", "AAAAAAAABBBBCCCC"]),
        ),
        max_size=12,
    ),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=20),
)
def test_overlapping_known_secrets_are_masked_as_one_span_however_cut(
    parts: list[str], cuts: list[int]
) -> None:
    """docs/logs.md: where two forms overlap, neither shows: the leftmost match alone left 16 of
    the 20 bytes of a longer secret starting inside it on the disk."""
    data = "".join(parts).encode()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.log"
        with LogWriter(path, max_bytes=1 << 20, known_secrets=OVERLAPPING) as writer:
            at = 0
            for cut in itertools.cycle(cuts or [len(data) + 1]):
                if at >= len(data):
                    break
                writer.write(data[at : at + cut])
                at += cut
        written = path.read_bytes()
    # The forms worked out apart from the writer: built from its own list, a secret the writer
    # dropped would have been expected in clear too.
    forms = sorted(
        {form.encode() for secret in OVERLAPPING for form in secret_forms(secret)}, key=len, reverse=True
    )
    assert written == _union_reference(data, forms)


def test_two_overlapping_secrets_in_one_write() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.log"
        with LogWriter(path, max_bytes=1 << 20, known_secrets=OVERLAPPING[:2]) as writer:
            writer.write(b"x AAAAAAAABBBBCCCCCCCCCCCCCCCC y\n")
            writer.runner_line("also AAAAAAAABBBBCCCCCCCCCCCCCCCC here")
        assert path.read_bytes() == b"x [REDACTED] y\n[runner] also [REDACTED] here\n"
    from codex_runner.secrets import mask

    assert mask("x AAAAAAAABBBBCCCCCCCCCCCCCCCC y", OVERLAPPING[:2]) == "x [REDACTED] y"
