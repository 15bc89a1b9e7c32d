"""`codex-runner backup` and `restore` (SPEC §9).

An archive `<backup dir>/runner-<UTC timestamp>.tar.gz` holds the database (SQLite through the
online backup API, PostgreSQL through `pg_dump -Fc`), `logs/`, `runs/<job>/manifest.json` and, last,
`MANIFEST.json`: the SHA-256 and size of every member and a checksum over that list. A sidecar
`<archive>.sha256` holds the SHA-256 of the whole archive. Restore checks all of it before it
touches anything, and refuses while a runner instance is live unless forced.

PostgreSQL tools get the connection through libpq variables (PGHOST, PGUSER, PGPASSWORD, …), so no
credential ever appears in an argument list.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from codex_runner import __version__
from codex_runner.config import Settings, make_data_dir
from codex_runner.errors import RunnerError
from codex_runner.secrets import mask
from codex_runner.store import create_store_engine
from codex_runner.store.engine import normalise_url
from codex_runner.store.instances import InstanceRegistry
from codex_runner.store.migrate import head_revision, is_known
from codex_runner.store.records import iso, utcnow
from codex_runner.store.schema import instances

FORMAT = 1
MANIFEST = "MANIFEST.json"
SQLITE_MEMBER = "database.sqlite3"
PG_MEMBER = "database.pgdump"
_STAMP = "%Y%m%dT%H%M%SZ"
_ARCHIVE = re.compile(r"^runner-(\d{8}T\d{6}Z)(?:-\d+)?\.tar\.gz$")
_RUN_MANIFEST = re.compile(r"^runs/[0-9a-f-]{36}/manifest\.json$")
_CHUNK = 1024 * 1024
# URL query parameters that libpq also reads from the environment.
_LIBPQ_QUERY_ENV = {
    "host": "PGHOST",
    "port": "PGPORT",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
}


class BackupError(RunnerError):
    code = "backup_error"


@dataclass(frozen=True)
class BackupResult:
    path: Path
    sha256: str
    size: int
    members: int
    deleted: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "size": self.size,
            "members": self.members,
            "deleted": [str(p) for p in self.deleted],
        }


@dataclass(frozen=True)
class RestoreResult:
    archive: Path
    backend: str
    created_at: str
    logs: int
    manifests: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "archive": str(self.archive),
            "backend": self.backend,
            "created_at": self.created_at,
            "logs": self.logs,
            "manifests": self.manifests,
        }


# -- listing ----------------------------------------------------------------------------------


def list_backups(backup_dir: Path) -> list[tuple[datetime, Path]]:
    """Archives in `backup_dir`, oldest first, dated by the UTC timestamp in their name."""
    found: list[tuple[datetime, Path]] = []
    try:
        entries = list(backup_dir.iterdir())
    except OSError:
        return []
    for path in entries:
        m = _ARCHIVE.match(path.name)
        if m and path.is_file():
            found.append((datetime.strptime(m[1], _STAMP).replace(tzinfo=UTC), path))
    return sorted(found)


def newest_backup(backup_dir: Path) -> tuple[datetime, Path] | None:
    backups = list_backups(backup_dir)
    return backups[-1] if backups else None


# -- backup -----------------------------------------------------------------------------------


class _HashingReader:
    """Feeds tarfile exactly `size` bytes of `f`, hashing them on the way."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.remaining, self.digest = f, size, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        want = self.remaining if n < 0 else min(n, self.remaining)
        data = self.f.read(want)
        self.remaining -= len(data)
        self.digest.update(data)
        return data


def _add_file(tar: tarfile.TarFile, src: Path, arcname: str) -> dict[str, Any] | None:
    """Adds `src` as it is now (a log still growing is cut at its size when opened); None if it
    vanished meanwhile (retention)."""
    try:
        f = src.open("rb")
    except FileNotFoundError:
        return None
    with f:
        st = os.fstat(f.fileno())
        info = tarfile.TarInfo(arcname)
        info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), 0o600
        reader = _HashingReader(f, st.st_size)
        tar.addfile(info, reader)  # type: ignore[arg-type]
        return {"name": arcname, "size": st.st_size, "sha256": reader.digest.hexdigest()}


def _members_checksum(members: list[dict[str, Any]]) -> str:
    listing = sorted(members, key=lambda m: m["name"])
    return hashlib.sha256(json.dumps(listing, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _publish(part: Path, backup_dir: Path, now: datetime) -> Path:
    """Gives the finished archive `part` its name, never another backup's: two backups started in
    the same second (cron and one by hand) both found the same name free at their start, and the
    later rename replaced the earlier archive, whose command had printed that path and a SHA-256
    the file no longer had. A hard link takes a name only if it is free; a file system without hard
    links falls back to the check-then-rename."""
    stem = f"runner-{now.astimezone(UTC).strftime(_STAMP)}"
    n = 1
    while True:
        path = backup_dir / (f"{stem}.tar.gz" if n == 1 else f"{stem}-{n}.tar.gz")
        n += 1
        try:
            os.link(part, path)
        except FileExistsError:
            continue
        except OSError:
            if path.exists():
                continue
            os.replace(part, path)
            return path
        part.unlink()
        return path


def _log_files(log_dir: Path) -> Iterator[tuple[Path, str]]:
    if not log_dir.is_dir():
        return
    for path in sorted(log_dir.rglob("*")):
        # Index files are a cache that readers rebuild; temp files are half-written.
        if (
            path.is_file()
            and not path.is_symlink()
            and path.suffix != ".idx"
            and not path.name.startswith(".")
        ):
            yield path, "logs/" + path.relative_to(log_dir).as_posix()


def _run_manifests(runs_dir: Path) -> Iterator[tuple[Path, str]]:
    if not runs_dir.is_dir():
        return
    for path in sorted(runs_dir.glob("*/manifest.json")):
        arcname = f"runs/{path.parent.name}/manifest.json"
        if _RUN_MANIFEST.match(arcname) and path.is_file():
            yield path, arcname


def backup(
    settings: Settings,
    *,
    out_dir: Path | None = None,
    retention_days: int | None = None,
    now: datetime | None = None,
) -> BackupResult:
    """Writes one archive (atomically: a temp file renamed into place) and, with `retention_days`,
    deletes archives older than that, never the new one."""
    now = now or utcnow()
    out_dir = out_dir or settings.backup_dir
    if out_dir.is_relative_to(settings.data_dir):
        make_data_dir(settings)  # else `backups/` would make it 0755 on the way
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".backup-") as tmp_name:
        tmp = Path(tmp_name)
        backend, member, revision = _dump_database(settings, tmp)
        part = tmp / "archive.tar.gz"
        members: list[dict[str, Any]] = []
        with tarfile.open(part, "w:gz", compresslevel=6) as tar:
            sources = [
                (tmp / member, member),
                *_log_files(settings.log_dir),
                *_run_manifests(settings.runs_dir),
            ]
            for src, arcname in sources:
                entry = _add_file(tar, src, arcname)
                if entry is not None:
                    members.append(entry)
            doc = {
                "format": FORMAT,
                "created_at": iso(now),
                "runner_version": __version__,
                "runner_id": settings.id,
                "database": {"backend": backend, "member": member, "revision": revision},
                "members": members,
                "checksum": _members_checksum(members),
            }
            data = json.dumps(doc, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime, info.mode = len(data), int(now.timestamp()), 0o600
            tar.addfile(info, _BytesReader(data))  # type: ignore[arg-type]
        os.chmod(part, 0o600)
        digest = _file_sha256(part)
        size = part.stat().st_size
        final = _publish(part, out_dir, now)
    sidecar = final.with_name(final.name + ".sha256")
    sidecar.write_text(f"{digest}  {final.name}\n")
    deleted = _prune(out_dir, retention_days, now, keep=final) if retention_days is not None else []
    return BackupResult(final, digest, size, len(members) + 1, deleted)


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        chunk, self.pos = self.data[self.pos : end], min(end, len(self.data))
        return chunk


def _prune(out_dir: Path, days: int, now: datetime, *, keep: Path) -> list[Path]:
    cutoff = now - timedelta(days=days)
    deleted = []
    for when, path in list_backups(out_dir):
        if when < cutoff and path != keep:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)
            deleted.append(path)
    return deleted


# -- database dump and load -------------------------------------------------------------------


def _sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise BackupError("RUNNER_DATABASE_URL names an in-memory SQLite database: nothing to back up")
    return Path(database)


def _revision(settings: Settings) -> str | None:
    engine = create_store_engine(settings.database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def _dump_database(settings: Settings, tmp: Path) -> tuple[str, str, str | None]:
    """(backend, member name, alembic revision) after dumping the database into `tmp`."""
    if settings.is_sqlite:
        src_path = _sqlite_path(settings.database_url)
        if not src_path.is_file():
            raise BackupError(f"the SQLite database {src_path} does not exist")
    revision = _revision(settings)
    if settings.is_sqlite:
        # The online backup API copies a consistent snapshot while writers carry on.
        src = sqlite3.connect(src_path, timeout=30)
        dst = sqlite3.connect(tmp / SQLITE_MEMBER)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        return "sqlite", SQLITE_MEMBER, revision
    _run_pg(settings, "pg_dump", ["-Fc", "--no-owner", "--no-privileges", "-f", str(tmp / PG_MEMBER)])
    return "postgresql", PG_MEMBER, revision


def pg_env(url: str) -> dict[str, str]:
    """The environment for libpq tools: the URL's parts as PG* variables, over the current ones."""
    u = make_url(normalise_url(url))
    env = dict(os.environ)
    parts = {"PGHOST": u.host, "PGPORT": u.port, "PGUSER": u.username, "PGDATABASE": u.database}
    parts["PGPASSWORD"] = u.password if isinstance(u.password, str) else None
    for key, value in u.query.items():
        if key in _LIBPQ_QUERY_ENV:
            parts[_LIBPQ_QUERY_ENV[key]] = value if isinstance(value, str) else value[-1]
    env.update({k: str(v) for k, v in parts.items() if v not in (None, "")})
    env.setdefault("PGCONNECT_TIMEOUT", "10")
    return env


def _run_pg(settings: Settings, tool: str, args: list[str]) -> None:
    program = shutil.which(tool)
    if program is None:
        raise BackupError(
            f"{tool} is not installed (not on PATH): install the PostgreSQL client tools, "
            "the same major version as the server or newer"
        )
    done = subprocess.run(
        [program, *args], env=pg_env(settings.database_url), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        reason = mask(lines[-1] if lines else f"exit code {done.returncode}", settings.secret_values())
        raise BackupError(f"{tool} failed: {reason}")


def _load_database(settings: Settings, backend: str, dump: Path) -> None:
    if backend != ("sqlite" if settings.is_sqlite else "postgresql"):
        raise BackupError(f"the archive holds a {backend} database but RUNNER_DATABASE_URL is another kind")
    if backend == "sqlite":
        target = _sqlite_path(settings.database_url)
        target.parent.mkdir(parents=True, exist_ok=True)
        # The backup API in reverse: it replaces the pages in one transaction, with WAL handled,
        # so a reader never sees half a database and a failure leaves the old one.
        src = sqlite3.connect(dump)
        dst = sqlite3.connect(target, timeout=30)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        return
    # The dump as SQL, run by psql after a prelude that drops the runner's objects as they are
    # now, all in one transaction: a failed restore leaves the database as it was, and a backup
    # taken before an upgrade leaves none of the newer schema's tables, functions or triggers
    # behind (`--clean` drops only what the dump holds), so the next start migrates it again.
    # The database name comes from PGDATABASE.
    script = dump.with_suffix(".sql")
    prelude = dump.with_suffix(".prelude.sql")
    _run_pg(
        settings,
        "pg_restore",
        ["--clean", "--if-exists", "--no-owner", "--no-privileges", "-f", str(script), str(dump)],
    )
    prelude.write_text(_drop_runner_objects(settings))
    _run_pg(
        settings,
        "psql",
        ["-X", "-q", "--single-transaction", "-v", "ON_ERROR_STOP=1", "-f", str(prelude), "-f", str(script)],
    )


def _drop_runner_objects(settings: Settings) -> str:
    """SQL that drops the runner's tables (and with them their triggers) and functions in the
    database's current schema: `runner_*` and alembic's version table."""
    engine = create_store_engine(settings.database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            tables = conn.execute(
                sa.text(
                    "SELECT quote_ident(tablename) FROM pg_tables WHERE schemaname = current_schema() "
                    "AND (tablename LIKE 'runner\\_%' OR tablename = 'alembic_version')"
                )
            ).scalars()
            functions = conn.execute(
                sa.text(
                    "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                    "WHERE n.nspname = current_schema() AND p.proname LIKE 'runner\\_%'"
                )
            ).scalars()
            statements = [f"DROP TABLE IF EXISTS {name} CASCADE;" for name in tables]
            statements += [f"DROP FUNCTION IF EXISTS {name} CASCADE;" for name in functions]
    finally:
        engine.dispose()
    return "\n".join(statements) + "\n"


# -- restore ----------------------------------------------------------------------------------


def _safe_member(name: str) -> bool:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not name or "\\" in name:
        return False
    return (
        name in {MANIFEST, SQLITE_MEMBER, PG_MEMBER}
        or bool(_RUN_MANIFEST.match(name))
        or (len(p.parts) >= 2 and p.parts[0] == "logs")
    )


def verify_archive(archive: Path, into: Path) -> dict[str, Any]:
    """Extracts `archive` into `into` and checks the sidecar digest, every member's size and
    SHA-256 and the manifest's checksum. Returns the manifest; raises `BackupError` otherwise."""
    if not archive.is_file():
        raise BackupError(f"archive {archive} does not exist")
    sidecar = archive.with_name(archive.name + ".sha256")
    if sidecar.is_file():
        words = sidecar.read_text().split()
        if _file_sha256(archive) != (words[0] if words else ""):
            raise BackupError(f"archive {archive.name} does not match its checksum {sidecar.name}: corrupt")
    seen: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for info in tar:
                if not info.isfile() or not _safe_member(info.name) or info.name in seen:
                    raise BackupError(f"archive {archive.name} has an unexpected member {info.name!r}")
                src = tar.extractfile(info)
                assert src is not None
                dest = into / info.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with src, dest.open("wb") as out:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                seen[info.name] = {"name": info.name, "size": info.size, "sha256": digest.hexdigest()}
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise BackupError(f"archive {archive.name} is corrupt or truncated ({type(exc).__name__})") from None
    manifest = _read_manifest(archive, into, seen)
    listed = {m["name"]: m for m in manifest["members"]}
    if set(listed) != set(seen) - {MANIFEST}:
        raise BackupError(f"archive {archive.name}: members differ from its manifest")
    for name, entry in listed.items():
        if seen[name]["sha256"] != entry["sha256"] or seen[name]["size"] != entry["size"]:
            raise BackupError(f"archive {archive.name}: member {name} fails its SHA-256 check")
    if _members_checksum(manifest["members"]) != manifest["checksum"]:
        raise BackupError(f"archive {archive.name}: the manifest checksum does not match")
    return manifest


def _read_manifest(archive: Path, into: Path, seen: dict[str, Any]) -> dict[str, Any]:
    if MANIFEST not in seen:
        raise BackupError(f"archive {archive.name} has no {MANIFEST}: not a codex-runner backup")
    try:
        manifest: dict[str, Any] = json.loads((into / MANIFEST).read_text())
        ok = manifest.get("format") == FORMAT and isinstance(manifest.get("members"), list)
        ok = ok and manifest["database"]["member"] in seen
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise BackupError(f"archive {archive.name}: {MANIFEST} is unreadable or of an unknown format")
    return manifest


def live_instances(settings: Settings) -> list[str]:
    """Runner instances that heartbeated within RUNNER_STALE_AFTER_SECONDS and did not stop."""
    if settings.is_sqlite and not _sqlite_path(settings.database_url).exists():
        return []
    engine = create_store_engine(settings.database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("runner_instances"):
                return []
        return InstanceRegistry(engine, settings.id).live_instances(settings.stale_after_seconds)
    finally:
        engine.dispose()


def _stop_restored_instances(settings: Settings) -> None:
    """Marks stopped the instance rows the archive brought back: heartbeats of the backup's second,
    they looked live for RUNNER_STALE_AFTER_SECONDS (a second restore refused, a `serve` on another
    host under one of those ids waited). Only when no instance was live as the restore began: then
    none of those rows is a running process's (a forced restore under a live one leaves them)."""
    engine = create_store_engine(settings.database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            if sa.inspect(conn).has_table("runner_instances"):
                conn.execute(
                    instances.update().where(instances.c.stopped_at.is_(None)).values(stopped_at=utcnow())
                )
    finally:
        engine.dispose()


def _place(src: Path, dest: Path) -> None:
    """Copies `src` over `dest` atomically (temp file in the destination folder, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.restore")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o600)
    os.replace(tmp, dest)


def restore(settings: Settings, archive: Path, *, force: bool = False) -> RestoreResult:
    """Verifies `archive`, refuses while an instance is live (unless `force`), then loads the
    database and puts back the logs and run manifests."""
    make_data_dir(settings)
    with tempfile.TemporaryDirectory(dir=settings.data_dir, prefix=".restore-") as tmp_name:
        tmp = Path(tmp_name)
        manifest = verify_archive(archive, tmp)
        revision = manifest["database"].get("revision")
        if not is_known(revision):
            # Loaded, it would replace a working database with one that serve, worker, migrate and
            # every admin command of this version refuse (it cannot downgrade a schema).
            raise BackupError(
                f"archive {archive.name} holds a database at schema revision {revision}, newer than "
                f"this version of codex-runner ({__version__}, newest revision {head_revision()}): "
                "restore it with the version that made it"
            )
        live = live_instances(settings)
        if live and not force:
            raise BackupError(
                f"runner instance(s) {', '.join(live)} are live: stop them first, or pass --force"
            )
        db = manifest["database"]
        _load_database(settings, db["backend"], tmp / db["member"])
        if not live:
            _stop_restored_instances(settings)
        logs = manifests = 0
        for entry in manifest["members"]:
            name = entry["name"]
            if name.startswith("logs/"):
                _place(tmp / name, settings.log_dir / name[len("logs/") :])
                logs += 1
            elif name.startswith("runs/"):
                _place(tmp / name, settings.runs_dir / name[len("runs/") :])
                manifests += 1
    return RestoreResult(archive, db["backend"], manifest["created_at"], logs, manifests)
