"""API tokens (stored as SHA-256 hashes only) and encrypted git credentials."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from codex_runner import secrets
from codex_runner.errors import CryptoError, InvalidRequest, NotFound
from codex_runner.store.engine import read_txn, with_retries, write_txn
from codex_runner.store.records import iso, utcnow
from codex_runner.store.schema import credentials, tokens

ROLES = ("user", "admin")

_CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CREDENTIAL_HOST = re.compile(r"[A-Za-z0-9._:\[\]-]{1,255}")


@dataclass(frozen=True)
class Principal:
    user: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


_BY_HASHES = sa.select(tokens.c.user, tokens.c.role, tokens.c.token_hash, tokens.c.revoked_at).where(
    tokens.c.token_hash.in_(sa.bindparam("hashes", expanding=True))
)


#: The longest user name (the `user`/`requested_by` columns hold 200 characters).
MAX_USER_LENGTH = 200


#: The actor of the runner's own events (`system`) and the prefix of an admin command's
#: (`cli:<login>`, cli/admin.py): no user may be named so, or its actions would read as theirs.
SYSTEM_ACTOR = "system"
CLI_ACTOR_PREFIX = "cli:"


def valid_user(user: object) -> TypeGuard[str]:
    """A user name as the runner allows it, from a token or a JWT `sub`: 1-200 printable
    characters (a NUL or a longer one would reach the database as a parameter it refuses), and
    not an actor name the runner keeps for itself (in any case: `System` reads as `system`)."""
    return (
        isinstance(user, str)
        and 0 < len(user) <= MAX_USER_LENGTH
        and user.isprintable()
        and user.casefold() != SYSTEM_ACTOR
        and not user.casefold().startswith(CLI_ACTOR_PREFIX)
    )


class TokenStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, user: str, role: str = "user", name: str = "") -> tuple[str, dict[str, Any]]:
        """Returns the new token (shown once, never stored) and its public record."""
        if role not in ROLES:
            raise InvalidRequest(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if not valid_user(user):
            raise InvalidRequest(
                f"user must be 1-200 printable characters, not {SYSTEM_ACTOR!r} nor starting {CLI_ACTOR_PREFIX!r}"
            )
        if user != user.strip():
            # `alice ` is another user than `alice` (another queue, other jobs) that looks the same
            # in every table. Tokens stored before this check keep working.
            raise InvalidRequest(f"user must not begin or end with a blank, got {user!r}")
        if len(name) > 200 or any(ord(c) < 32 or ord(c) == 127 for c in name):
            # A column of 200 (PostgreSQL refused more with a DataError), shown by `tokens list`.
            raise InvalidRequest("token name: at most 200 characters, no control characters")
        token = secrets.new_api_token()
        row = {
            "id": str(uuid.uuid4()),
            "user": user,
            "role": role,
            "name": name,
            "token_hash": secrets.hash_token(token),
            "created_at": utcnow(),
        }

        def txn() -> None:
            with write_txn(self.engine, op="tokens.create") as conn:
                conn.execute(tokens.insert().values(**row))

        with_retries(txn)
        return token, self._public({**row, "revoked_at": None})

    @staticmethod
    def _public(row: Any) -> dict[str, Any]:
        return {
            "id": row["id"],
            "user": row["user"],
            "role": row["role"],
            "name": row["name"],
            "created_at": iso(row["created_at"]),
            "revoked_at": iso(row["revoked_at"]),
        }

    def authenticate(self, token: str) -> Principal | None:
        return self.authenticate_many([token])[0]

    def authenticate_many(self, raw_tokens: Sequence[str]) -> list[Principal | None]:
        """Each token's principal, or None for an unknown or revoked one, in one read: looked up by
        hash (an index hit), then the hashes compared in constant time. No cache, so a revoked
        token fails on its very next request."""
        digests = [secrets.hash_token(t) for t in raw_tokens]
        if not digests:
            return []

        def txn() -> dict[str, tuple[str, Principal]]:
            with read_txn(self.engine) as conn:
                rows = conn.execute(_BY_HASHES, {"hashes": sorted(set(digests))}).all()
            return {
                r.token_hash: (r.token_hash, Principal(r.user, r.role)) for r in rows if r.revoked_at is None
            }

        found = with_retries(txn)
        out: list[Principal | None] = []
        for digest in digests:
            hit = found.get(digest)
            out.append(hit[1] if hit is not None and secrets.tokens_equal(hit[0], digest) else None)
        return out

    def list(self) -> list[dict[str, Any]]:
        def txn() -> list[dict[str, Any]]:
            with read_txn(self.engine) as conn:
                rows = conn.execute(sa.select(tokens).order_by(tokens.c.created_at)).mappings()
                return [self._public(r) for r in rows]

        return with_retries(txn)

    def revoke(self, token_id: str) -> tuple[dict[str, Any], bool]:
        """The token's record, and whether this call revoked it (False: it already was)."""

        def txn() -> tuple[dict[str, Any], bool]:
            with write_txn(self.engine, op="tokens.revoke") as conn:
                changed = conn.execute(
                    tokens.update()
                    .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                    .values(revoked_at=utcnow())
                ).rowcount
                row = conn.execute(sa.select(tokens).where(tokens.c.id == token_id)).mappings().first()
                if row is None:
                    raise NotFound(f"token {token_id} not found")
                return self._public(row), changed == 1

        return with_retries(txn)


class CredentialStore:
    """Git credentials, AES-256-GCM encrypted; the name is bound as associated data so a blob
    cannot be moved to another credential."""

    def __init__(self, engine: Engine, key: bytes | None, previous_keys: Sequence[bytes] = ()) -> None:
        self.engine = engine
        self.key = key
        self.previous_keys = list(previous_keys)

    def _require_key(self) -> bytes:
        if self.key is None:
            raise CryptoError("RUNNER_ENCRYPTION_KEY is not set; run `codex-runner keygen` and set it")
        return self.key

    def set(self, name: str, host: str, username: str, secret: str) -> dict[str, Any]:
        if not name or not host:
            raise InvalidRequest("credential name and host are required")
        # What a repo's `credential = "NAME"` and git's credential protocol accept (catalog/parse.py,
        # execution/git.py): anything else is stored but could never be used.
        if not _CREDENTIAL_NAME.fullmatch(name):
            raise InvalidRequest(
                "credential name: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if host.startswith("-") or not _CREDENTIAL_HOST.fullmatch(host):
            raise InvalidRequest("credential host: a host name (and port), such as github.com")
        if not secret:
            raise InvalidRequest("the secret read from standard input is empty")
        if any(c in value for value in (username, secret) for c in "\r\n\0"):
            raise InvalidRequest("the user name and the secret must be one line (no line break or NUL)")
        if len(username) > 200 or any(ord(c) < 32 for c in username):
            raise InvalidRequest("credential user name: at most 200 characters, no control characters")
        blob = secrets.encrypt(self._require_key(), secret.encode(), name.encode())
        now = utcnow()

        def txn() -> None:
            with write_txn(self.engine, op="credentials.set") as conn:
                conn.execute(credentials.delete().where(credentials.c.name == name))
                conn.execute(
                    credentials.insert().values(
                        name=name,
                        host=host,
                        username=username,
                        secret_enc=blob,
                        created_at=now,
                        updated_at=now,
                    )
                )

        with_retries(txn)
        return {"name": name, "host": host, "username": username, "updated_at": iso(now)}

    def list(self) -> list[dict[str, Any]]:
        def txn() -> list[dict[str, Any]]:
            with read_txn(self.engine) as conn:
                rows = conn.execute(
                    sa.select(
                        credentials.c.name,
                        credentials.c.host,
                        credentials.c.username,
                        credentials.c.updated_at,
                    )
                ).mappings()
                return [{**dict(r), "updated_at": iso(r["updated_at"])} for r in rows]

        return with_retries(txn)

    def count(self) -> int:
        def txn() -> int:
            with read_txn(self.engine) as conn:
                return int(conn.execute(sa.select(sa.func.count()).select_from(credentials)).scalar_one())

        return with_retries(txn)

    def delete(self, name: str) -> None:
        def txn() -> int:
            with write_txn(self.engine, op="credentials.delete") as conn:
                return conn.execute(credentials.delete().where(credentials.c.name == name)).rowcount

        if with_retries(txn) == 0:
            raise NotFound(f"credential {name!r} not found")

    def get_secret(self, name: str) -> tuple[str, str, str]:
        """(host, username, secret) — decrypted in memory for one git command."""

        def txn() -> Any:
            with read_txn(self.engine) as conn:
                return (
                    conn.execute(sa.select(credentials).where(credentials.c.name == name)).mappings().first()
                )

        row = with_retries(txn)
        if row is None:
            raise NotFound(f"credential {name!r} not found")
        keys = [self._require_key(), *self.previous_keys]
        secret = secrets.decrypt(keys, row["secret_enc"], name.encode()).decode()
        return row["host"], row["username"], secret

    def rotate(self) -> int:
        """Re-encrypts every credential under the current key (reading with current or previous)."""
        key = self._require_key()
        keys = [key, *self.previous_keys]

        def txn() -> int:
            with write_txn(self.engine, op="credentials.rotate") as conn:
                # Locked as read (PostgreSQL; SQLite's write lock is whole), and each written back
                # only if still the blob read: a `credentials set` in between (the leaked-secret
                # runbook) must not get its old secret back, re-encrypted.
                rows = conn.execute(
                    sa.select(credentials.c.name, credentials.c.secret_enc).with_for_update()
                ).all()
                for name, blob in rows:
                    plain = secrets.decrypt(keys, blob, name.encode())
                    conn.execute(
                        credentials.update()
                        .where(credentials.c.name == name, credentials.c.secret_enc == blob)
                        .values(secret_enc=secrets.encrypt(key, plain, name.encode()), updated_at=utcnow())
                    )
                return len(rows)

        return with_retries(txn)
