"""AES-256-GCM for stored credentials, key parsing, API token hashing and secret masking."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets as _secrets
from collections.abc import Iterable
from typing import AnyStr

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from codex_runner.errors import CryptoError

NONCE_BYTES = 12
TOKEN_PREFIX = "cr_"


def parse_key(text: str) -> bytes:
    """Accepts 64 hex characters, base64 of 32 bytes, or 32 raw bytes (SPEC §2)."""
    stripped = text.strip()
    if len(stripped) == 64:
        try:
            return bytes.fromhex(stripped)
        except ValueError:
            pass
    try:
        decoded = base64.b64decode(stripped, validate=True)
        if len(decoded) == 32:
            return decoded
    except (binascii.Error, ValueError):
        pass
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) == 32:
        return raw
    raise CryptoError("encryption key must be 64 hex characters, base64 of 32 bytes, or 32 raw bytes")


def generate_key() -> str:
    return _secrets.token_bytes(32).hex()


def encrypt(key: bytes, plaintext: bytes, associated: bytes = b"") -> bytes:
    """Returns nonce ‖ ciphertext ‖ tag (12-byte nonce, 16-byte tag)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated or None)


def decrypt(keys: Iterable[bytes], blob: bytes, associated: bytes = b"") -> bytes:
    """Tries each key in turn (current first, then previous) so rotation can be gradual."""
    nonce, body = blob[:NONCE_BYTES], blob[NONCE_BYTES:]
    for key in keys:
        try:
            return AESGCM(key).decrypt(nonce, body, associated or None)
        except InvalidTag:
            continue
    raise CryptoError("stored credential cannot be decrypted with the configured key(s)")


def new_api_token() -> str:
    return TOKEN_PREFIX + _secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Tokens are random 256-bit values, so a plain SHA-256 is a sound, fast lookup hash."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def tokens_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


# Passed-through variables whose values are known secrets of a job (masked in its log): named like
# secrets — a name containing one of these, or with one of the parts below between underscores
# (`DB_PASS`, `GH_PAT`, `SENTRY_DSN`; not `PATH`) — or holding a URL with a user part
# (`https://user:pw@proxy`, a DSN), whatever its name.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|AUTH", re.IGNORECASE)
_SECRET_NAME_PARTS = frozenset(
    {"PASS", "PWD", "PW", "PAT", "DSN", "PRIVATE", "COOKIE", "SESSION", "SIGNATURE", "WEBHOOK"}
)
_URL_WITH_USER = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s@]+@")


def is_secret_variable(name: str, value: str) -> bool:
    """Whether a variable passed through to a job holds a secret (docs/logs.md, "Known secrets")."""
    if _SECRET_NAME.search(name) or _URL_WITH_USER.search(value):
        return True
    return name.upper() != "PWD" and not _SECRET_NAME_PARTS.isdisjoint(name.upper().split("_"))


def secret_bytes(value: str) -> bytes:
    """The bytes of a secret as a process sees them. Values from os.environ carry bytes that are
    not UTF-8 as lone surrogates (surrogateescape): those become the original bytes again, where a
    plain `encode()` would raise. Any other lone surrogate cannot occur in output: U+FFFD's bytes."""
    try:
        return value.encode()
    except UnicodeEncodeError:
        try:
            return value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace")


def secret_forms(value: str, min_length: int = 8) -> list[str]:
    """A secret and the encodings it most often leaks in: base64 (standard and URL-safe; also
    wrapped at 76 columns, as `base64` and MIME write it) and percent-encoding (with `/` kept or
    not, `+` for a space, hex digits in either case). A value read from a file often ends in a
    newline the program using it drops: the value without its surrounding white space counts too.
    Values shorter than `min_length` are ignored: masking them would shred logs."""
    forms: set[str] = set()
    for candidate in {value, value.strip()}:
        if len(candidate) >= min_length:
            forms |= _forms_of(candidate)
    return sorted((f for f in forms if len(f) >= min_length), key=len, reverse=True)


_PERCENT_ESCAPE = re.compile(r"%[0-9A-F]{2}")


def _forms_of(value: str) -> set[str]:
    from urllib.parse import quote, quote_plus

    raw = secret_bytes(value)
    standard = base64.b64encode(raw).decode()
    forms = {value, standard.rstrip("="), base64.urlsafe_b64encode(raw).decode().rstrip("=")}
    for lines in ("\n", "\r\n"):
        forms.add(lines.join(standard[i : i + 76] for i in range(0, len(standard), 76)).rstrip("="))
    for encoded in (
        quote(raw, safe=""),
        quote(raw, safe="/"),
        quote_plus(raw, safe=""),
        quote_plus(raw, safe="/"),
    ):
        forms.add(encoded)
        forms.add(_PERCENT_ESCAPE.sub(lambda m: m.group().lower(), encoded))
    # Inside a longer encoded value (`Basic base64(user:token)`, a docker `auth`), the secret may
    # start at any of the three byte positions of a base64 group, and bytes may follow it: the
    # characters that depend on the secret's bytes alone, for each alignment.
    for offset, lead in ((0, 0), (1, 2), (2, 3)):
        trail = 1 if (offset + len(raw)) % 3 else 0
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * offset + raw).decode().rstrip("=")
            forms.add(encoded[lead : len(encoded) - trail])
    return forms


def mask(text: str, values: Iterable[str], replacement: str = "[REDACTED]") -> str:
    """Replaces every known secret (and its encodings) in `text`."""
    return Masker(values, replacement)(text)


class Masker:
    """Replaces every one of a set of secrets (and its encodings) in the texts it is given; for
    secrets known in advance (the runtime's own), keep one: their encodings are worked out once. A
    service log line masks every value it carries, and encoding the secrets again for each value
    was most of the line's cost."""

    def __init__(self, values: Iterable[str], replacement: str = "[REDACTED]") -> None:
        forms = {form for value in values for form in secret_forms(value)}
        # Longest first: at one position the longest form matches.
        self.forms = sorted(forms, key=len, reverse=True)
        self.replacement = replacement
        self._pattern = re.compile("|".join(re.escape(form) for form in self.forms)) if forms else None

    def __bool__(self) -> bool:
        return bool(self.forms)

    def __call__(self, text: str) -> str:
        if self._pattern is None or not any(form in text for form in self.forms):
            return text
        return replace_spans(text, union_spans(self._pattern, text), self.replacement)


def union_spans(pattern: re.Pattern[AnyStr], text: AnyStr, stop: int | None = None) -> list[list[int]]:
    """Where `pattern` (secrets' forms, longest first) matches in `text`, starting before `stop`,
    with overlapping matches merged: two secrets that overlap are masked as one span. Replacing
    the leftmost match only (as `re.sub` does) would leave the rest of a longer secret that starts
    inside it, and replacing the longest first the start of the other one."""
    limit = len(text) if stop is None else stop
    spans: list[list[int]] = []
    at = 0
    while (match := pattern.search(text, at)) is not None:
        start, end = match.span()
        if spans and start < spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        elif start >= limit:
            break
        else:
            spans.append([start, end])
        at = start + 1
    return spans


def replace_spans(text: AnyStr, spans: list[list[int]], replacement: AnyStr) -> AnyStr:
    parts: list[AnyStr] = []
    pos = 0
    for start, end in spans:
        parts.append(text[pos:start])
        parts.append(replacement)
        pos = end
    parts.append(text[pos:])
    return text[:0].join(parts)


def utf8_tail(text: str, limit: int) -> str:
    """The end of `text` that fits in `limit` bytes of UTF-8 (SPEC §3: a stderr tail of at most
    8 KiB). Cut by characters, a tail of invalid bytes, each decoded as a 3-byte U+FFFD, came to
    three times that. A character the cut splits is dropped whole."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[-limit:].decode("utf-8", "ignore")
