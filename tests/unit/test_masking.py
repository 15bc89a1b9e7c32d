"""Secret masking (`secrets.mask`, `secrets.Masker`, `ops.logging.mask_value`): every encoding of
every known secret, in nested values, the same answer whichever way it is asked."""

from __future__ import annotations

import base64
from urllib.parse import quote

from codex_runner.ops.logging import mask_value
from codex_runner.secrets import Masker, mask

SECRET = "s3cr3t/value+with=odd chars"
OTHER = "another-long-secret"


def _leaks() -> list[str]:
    raw = SECRET.encode()
    return [
        SECRET,
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        quote(SECRET, safe=""),
    ]


def test_masker_masks_every_form_like_mask() -> None:
    masker = Masker([SECRET, OTHER])
    for leak in _leaks():
        text = f"before {leak} middle {OTHER} after"
        assert masker(text) == mask(text, [SECRET, OTHER]) == "before [REDACTED] middle [REDACTED] after"


def test_masker_masks_the_longer_secret_whole() -> None:
    """A secret that holds another is masked as one, whichever order they were given in."""
    longer = OTHER + "-and-more"
    for order in ([OTHER, longer], [longer, OTHER]):
        assert Masker(order)(f"x {longer} y") == "x [REDACTED] y"
        assert mask(f"x {longer} y", order) == "x [REDACTED] y"  # no "-and-more" left over


def test_masker_without_secrets_changes_nothing() -> None:
    short = Masker(["short", ""])  # under 8 characters: never masked, it would shred the logs
    assert not short
    assert short("a short text") == "a short text"
    assert mask_value({"a": "short"}, ["short"]) == {"a": "short"}


def test_mask_value_reaches_nested_and_other_values() -> None:
    class Opaque:
        def __str__(self) -> str:
            return f"opaque {SECRET}"

    value = {"a": [SECRET, {"b": (1, None, f"x{SECRET}")}], "c": Opaque(), "d": 2.5, "e": True}
    expected = {
        "a": ["[REDACTED]", {"b": [1, None, "x[REDACTED]"]}],
        "c": "opaque [REDACTED]",
        "d": 2.5,
        "e": True,
    }
    assert mask_value(value, [SECRET]) == expected
    assert mask_value(value, Masker([SECRET])) == expected


def test_utf8_tail_cuts_by_bytes_and_never_splits_a_character() -> None:
    from codex_runner.secrets import utf8_tail

    assert utf8_tail("abc", 8) == "abc"
    assert utf8_tail("xé" * 10, 5) == "éxé"
    assert utf8_tail("é" * 10, 5) == "éé"  # the "é" the cut splits is dropped whole
    assert utf8_tail("\ufffd" * 4000, 8192) == "\ufffd" * 2730
    assert len(utf8_tail("a\ud800b" * 5, 4).encode("utf-8")) <= 4  # a lone surrogate does not raise
