"""Admin commands on the local database: `tokens`, `credentials`, `migrate`, `keygen`.

They use the same store services as the API, through `Runtime`, with no server running. The
database layers are imported inside the commands: client commands should not pay for them.
"""

from __future__ import annotations

import getpass
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer

from codex_runner.cli.common import CliError, cell, data_table, info, out, print_json, settings
from codex_runner.config import Settings

if TYPE_CHECKING:
    from codex_runner.runtime import Runtime

tokens_app = typer.Typer(help="API tokens: create, list, revoke.", no_args_is_help=True)
credentials_app = typer.Typer(help="Encrypted git credentials for clone and push.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


class Role(StrEnum):
    user = "user"
    admin = "admin"


@contextmanager
def admin_runtime(loaded: Settings | None = None) -> Iterator[Runtime]:
    """A Runtime on the local database, migrated to head.

    `migrate=False` skips `Runtime.open`'s repo sync on purpose: an admin command run with another
    runner.toml (or none) must not disable the repos a running server has configured."""
    from codex_runner.ops.logging import configure_logging
    from codex_runner.runtime import Runtime
    from codex_runner.store.migrate import upgrade

    loaded = loaded or settings()
    # Service log lines (and so audit traces) go to stderr: stdout carries only data.
    configure_logging(loaded)
    # A one-shot command says what it did in one line; migration chatter is for `serve`'s log.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    rt = Runtime.open(loaded, migrate=False)
    try:
        upgrade(rt.engine)
        yield rt
    finally:
        rt.close()


def cli_actor() -> str:
    """Who runs the command, for the audit log: the login name, else the uid. Worked out before the
    action: `getpass.getuser()` raises in a container whose uid has no passwd entry (and no USER),
    which failed the command after its change was made, with no audit line."""
    try:
        name = getpass.getuser()
    except Exception:
        name = ""
    if not name or any(ord(c) < 32 for c in name):
        name = f"uid:{os.getuid()}"
    return f"cli:{name}"


def audit(rt: Runtime, action: str, meta: dict[str, object], actor: str | None = None) -> None:
    """Admin actions have no job: they go to the audit log (and the service log) only."""
    from codex_runner.ops.audit import audit_admin

    audit_admin(rt, action, actor or cli_actor(), dict(meta))


def safe_database_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@tokens_app.command("create")
def tokens_create(
    user: Annotated[str, typer.Option("--user", "-u", help="The user the token acts as.")],
    role: Annotated[Role, typer.Option(help="admin sees and cancels every job.")] = Role.user,
    name: Annotated[str, typer.Option(help="A label, e.g. where the token is used.")] = "",
) -> None:
    """Create a token. Prints the token, and only it, on stdout: it is shown once."""
    actor = cli_actor()
    with admin_runtime() as rt:
        token, record = rt.tokens.create(user, role.value, name)
        audit(rt, "token_created", {"token_id": record["id"], "user": user, "role": role.value}, actor)
    sys.stdout.write(token + "\n")
    sys.stdout.flush()
    info(f"created {record['role']} token {record['id']} for user {record['user']!r}; it is not shown again")


@tokens_app.command("list")
def tokens_list(json_out: JsonOpt = False) -> None:
    """List tokens (never the tokens themselves: only their hashes are stored)."""
    with admin_runtime() as rt:
        records = rt.tokens.list()
    if json_out:
        print_json(records)
        return
    if not records:
        info("no tokens (`codex-runner tokens create --user USER` makes one)")
        return
    table = data_table("ID", "USER", "ROLE", "NAME", "CREATED", "REVOKED")
    for r in records:
        table.add_row(*(cell(r[k]) for k in ("id", "user", "role", "name", "created_at", "revoked_at")))
    out.print(table)


@tokens_app.command("revoke")
def tokens_revoke(token_id: Annotated[str, typer.Argument(help="The token's id.")]) -> None:
    """Revoke a token: it stops working at once."""
    actor = cli_actor()
    with admin_runtime() as rt:
        record, revoked = rt.tokens.revoke(token_id)
        if revoked:
            audit(rt, "token_revoked", {"token_id": record["id"], "user": record["user"]}, actor)
    if not revoked:
        info(f"token {record['id']} of user {record['user']!r} was already revoked at {record['revoked_at']}")
        return
    info(f"revoked token {record['id']} of user {record['user']!r} at {record['revoked_at']}")


def read_secret(name: str) -> str:
    """The secret from standard input, without one trailing newline (as `echo` adds); from a
    terminal, a prompt that does not echo. Never from argv, which other users can read in /proc."""
    if sys.stdin.isatty():
        return getpass.getpass(f"secret for {name}: ")
    text = sys.stdin.read()
    for ending in ("\r\n", "\n"):
        if text.endswith(ending):
            return text[: -len(ending)]
    return text


@credentials_app.command("set")
def credentials_set(
    name: Annotated[str, typer.Argument(help='The name repos use in `credential = "NAME"`.')],
    host: Annotated[str, typer.Option(help="The git host it is for, e.g. github.com.")],
    username: Annotated[str, typer.Option(help="User name git sends with it.")] = "oauth2",
) -> None:
    """Store (or replace) a credential; the secret is read from standard input."""
    loaded = settings()
    if not loaded.encryption_key:
        raise CliError("RUNNER_ENCRYPTION_KEY is not set; create one with `codex-runner keygen` and set it")
    actor = cli_actor()
    with admin_runtime(loaded) as rt:
        secret = read_secret(name)
        record = rt.credentials.set(name, host, username, secret)
        audit(rt, "credential_set", {"name": name, "host": host, "username": username}, actor)
    info(f"stored credential {record['name']!r} for {record['username']}@{record['host']} (encrypted)")


@credentials_app.command("list")
def credentials_list(json_out: JsonOpt = False) -> None:
    """List credentials: names, hosts and user names, never the secrets."""
    with admin_runtime() as rt:
        records = rt.credentials.list()
    if json_out:
        print_json(records)
        return
    if not records:  # as `jobs list`: a table of headers alone said nothing
        info("no credentials stored (`codex-runner credentials set NAME --host HOST` stores one)")
        return
    table = data_table("NAME", "HOST", "USERNAME", "UPDATED")
    for r in records:
        table.add_row(*(cell(r[k]) for k in ("name", "host", "username", "updated_at")))
    out.print(table)


@credentials_app.command("delete")
def credentials_delete(name: Annotated[str, typer.Argument(help="The credential's name.")]) -> None:
    """Delete a credential."""
    actor = cli_actor()
    with admin_runtime() as rt:
        rt.credentials.delete(name)
        audit(rt, "credential_deleted", {"name": name}, actor)
    info(f"deleted credential {name!r}")


@credentials_app.command("rotate")
def credentials_rotate() -> None:
    """Re-encrypt every credential under RUNNER_ENCRYPTION_KEY, reading with it or with
    RUNNER_ENCRYPTION_KEY_PREVIOUS."""
    actor = cli_actor()
    with admin_runtime() as rt:
        count = rt.credentials.rotate()
        audit(rt, "credentials_rotated", {"count": count}, actor)
    info(f"re-encrypted {count} credential(s) under the current RUNNER_ENCRYPTION_KEY")


def migrate() -> None:
    """Bring the database schema to the latest version (serve and worker also do it at start-up)."""
    from codex_runner.store import create_store_engine
    from codex_runner.store.migrate import current_revision, head_revision, upgrade

    loaded = settings()
    engine = create_store_engine(loaded.database_url)
    try:
        before = current_revision(engine)
        upgrade(engine)
        after = current_revision(engine)
    finally:
        engine.dispose()
    where = safe_database_url(loaded.database_url)
    if before == after:
        info(f"database {where} is up to date (revision {after})")
    else:
        info(
            f"database {where} migrated from revision {before or 'empty'} to {after} (head {head_revision()})"
        )


def keygen() -> None:
    """Print a new random RUNNER_ENCRYPTION_KEY (64 hex characters)."""
    from codex_runner.secrets import generate_key

    sys.stdout.write(generate_key() + "\n")
