"""Secret masking (`secrets.mask`, `secrets.Masker`, `ops.logging.mask_value`): every encoding of
every known secret, in nested values, the same answer whichever way it is asked."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from urllib.parse import quote, quote_plus

import pytest

from codex_runner.ops.logging import mask_value
from codex_runner.secrets import Masker, is_secret_variable, mask

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


@pytest.mark.parametrize(
    "shown",
    [
        pytest.param(lambda v: quote(v), id="quote-keeping-slash"),
        pytest.param(lambda v: re.sub("%..", lambda m: m.group().lower(), quote(v, safe="")), id="lower-hex"),
        pytest.param(lambda v: quote_plus(v), id="quote-plus"),
        pytest.param(lambda v: v.strip(), id="without-its-newline"),
        pytest.param(
            lambda v: base64.b64encode(v.strip().encode()).decode().rstrip("="), id="base64-without-newline"
        ),
    ],
)
def test_every_common_encoding_of_a_secret_is_masked(shown: Callable[[str], str]) -> None:
    """Only `quote(value, safe="")` with upper-case hex was a form: Python's default `quote` (which
    keeps `/`), lower-case hex and `+` for spaces went through, as did a value read from a file with
    its newline when printed without it."""
    secret = "Ab+cd/Ef=gh Ij/Kl9z\n"
    text = f"before {shown(secret)} after"
    assert mask(text, [secret]) == "before [REDACTED] after"


def test_base64_wrapped_at_76_columns_is_masked() -> None:
    """`base64` and MIME wrap at 76 columns: the encoding of a secret over 57 bytes was never one
    unbroken string, and went through whole."""
    secret = (
        "xyzq_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghij"
    )
    for wrapped in (
        base64.encodebytes(secret.encode()).decode(),
        base64.encodebytes(secret.encode()).decode().replace("\n", "\r\n"),
    ):
        masked = mask(f"out:\n{wrapped}end", [secret])
        assert "[REDACTED]" in masked and all(
            line not in masked for line in wrapped.splitlines() if len(line) > 8
        )


@pytest.mark.parametrize(
    ("name", "value", "secret"),
    [
        ("OPENAI_API_KEY", "sk-abcdefgh", True),
        ("DB_PASS", "Vq8rT2wLm9Zx4Kc", True),
        ("GH_PAT", "pat-Hq7Lw2Nz8Rv3Tb6Y", True),
        ("SENTRY_DSN", "https://a1b2c3d4e5f6@o1.ingest.sentry.io/42", True),
        ("HTTPS_PROXY", "http://user:pw12345678@proxy:8080", True),
        ("SLACK_WEBHOOK", "https://hooks.slack.com/services/T/B/X", True),
        ("MYSQL_PWD", "hunter2hunter2", True),
        ("PATH", "/usr/bin:/bin", False),
        ("PWD", "/home/user/work", False),
        ("NODE_ENV", "production", False),
        ("CODEX_HOME", "/srv/codex", False),
        ("HTTPS_PROXY", "http://proxy:8080", False),
    ],
)
def test_which_passed_through_variables_are_secrets(name: str, value: str, secret: bool) -> None:
    """Only names with KEY, TOKEN, SECRET, PASSWORD, PASSWD, CREDENTIAL or AUTH in them were: a
    `DB_PASS`, a `GH_PAT`, a Sentry DSN reached the log in clear."""
    assert is_secret_variable(name, value) is secret
