"""Tokens, credentials and their audit trail, on a real database: what the admin commands change
and what they record."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from codex_runner import secrets
from codex_runner.errors import InvalidRequest
from codex_runner.store import create_store_engine
from codex_runner.store.admin import CredentialStore, TokenStore
from codex_runner.store.migrate import upgrade


@pytest.fixture
def engine(database_url: str) -> Iterator[object]:
    eng = create_store_engine(database_url)
    upgrade(eng)
    yield eng
    eng.dispose()


def test_a_rotation_never_brings_back_a_secret_set_meanwhile(
    engine: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leaked-secret runbook: the old secret is replaced while the key is rotated. The rotation
    read every row unlocked, then wrote each back by name: on PostgreSQL the new secret, set in
    between, was overwritten by the old one re-encrypted."""
    old, new = (secrets.parse_key(secrets.generate_key()) for _ in range(2))
    CredentialStore(engine, old).set("github", "github.com", "oauth2", "LEAKED-old-secret")  # type: ignore[arg-type]
    rotating = CredentialStore(engine, new, [old])  # type: ignore[arg-type]
    real_decrypt = secrets.decrypt
    read = threading.Event()

    def slow_decrypt(*args: object, **kwargs: object) -> bytes:
        if threading.current_thread() is rotation:
            read.set()
            time.sleep(1.0)  # the rows are read; a `credentials set` now comes in
        return real_decrypt(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(secrets, "decrypt", slow_decrypt)
    rotation = threading.Thread(target=rotating.rotate)
    rotation.start()
    assert read.wait(10)
    setter = threading.Thread(
        target=CredentialStore(engine, new, [old]).set,  # type: ignore[arg-type]
        args=("github", "github.com", "oauth2", "fresh-new-secret"),
    )
    setter.start()
    rotation.join(30)
    setter.join(30)
    monkeypatch.setattr(secrets, "decrypt", real_decrypt)
    assert CredentialStore(engine, new, [old]).get_secret("github")[2] == "fresh-new-secret"  # type: ignore[arg-type]


def test_revoking_twice_tells_and_names_are_bounded(engine: object) -> None:
    tokens = TokenStore(engine)  # type: ignore[arg-type]
    _, record = tokens.create("alice", "user", "ci")
    first, revoked = tokens.revoke(record["id"])
    assert revoked and first["revoked_at"] is not None
    again, revoked = tokens.revoke(record["id"])
    assert not revoked and again["revoked_at"] == first["revoked_at"]
    for name in ("x" * 201, "bell\x07"):
        with pytest.raises(InvalidRequest):
            tokens.create("alice", "user", name)
    key = secrets.parse_key(secrets.generate_key())
    with pytest.raises(InvalidRequest):
        CredentialStore(engine, key).set("gh", "github.com", "u" * 201, "s3cret")  # type: ignore[arg-type]


def test_a_token_for_a_user_name_padded_with_blanks_is_refused(engine: object) -> None:
    """`tokens create --user "alice "` made a user of its own beside `alice` (another queue,
    other jobs) that every table shows the same."""
    tokens = TokenStore(engine)  # type: ignore[arg-type]
    for user in (" alice", "alice ", "  "):
        with pytest.raises(InvalidRequest, match="blank"):
            tokens.create(user, "user")
    assert tokens.create("alice smith", "user")[1]["user"] == "alice smith"
