"""The audit log (SPEC §8): one JSON object per line — `ts`, `event_type`, `job_id`, `actor`,
`message`, `meta` — for every committed job event, each cleanup batch and each admin action, rotated
by size.

Several processes (a `serve`, a `worker`, an admin command) may append to one file, so each line is
written under an exclusive `flock` on a side file `<path>.lock`: the size check, the rotation and
the single `write` of the line happen together. The lock file never moves, unlike the log itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from codex_runner.errors import ConfigError
from codex_runner.ops.logging import mask_value
from codex_runner.secrets import Masker
from codex_runner.store.records import iso, utcnow

if TYPE_CHECKING:
    from codex_runner.runtime import Runtime

log = structlog.get_logger("codex_runner.audit")


def unusable(path: Path, exc: OSError) -> str:
    """Why the audit log at `path` cannot be written, for a message naming the setting."""
    if isinstance(exc, FileExistsError | NotADirectoryError):
        reason = "a file is in the way of its folder"
    elif isinstance(exc, IsADirectoryError):
        reason = "it is a folder"
    else:
        reason = exc.strerror or str(exc)
    return f"cannot write the audit log {path}: {reason}"


def check_writable(path: Path) -> None:
    """Raises `OSError` unless the audit log at `path` (and its lock file beside it) can be
    written. Changes nothing but the folder it makes: an existing file is opened for appending,
    a missing one tried as a temporary file in its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for target in (path, path.with_name(path.name + ".lock")):
        if os.path.exists(target):
            os.close(os.open(target, os.O_WRONLY | os.O_APPEND))
        else:
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".doctor-"):
                pass


class AuditLog:
    def __init__(
        self, path: Path, max_bytes: int = 5 * 1024 * 1024, backups: int = 5, secrets: Sequence[str] = ()
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.masker = Masker(secrets)  # the runtime's own secrets, their encodings worked out once
        self._lock_path = path.with_name(path.name + ".lock")
        self._thread_lock = threading.Lock()
        self._last_failure_logged = float("-inf")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # At `serve` start-up this was `unexpected FileExistsError`, naming no setting.
            raise ConfigError(f"RUNNER_AUDIT_LOG: {unusable(path, exc)}") from None

    @classmethod
    def from_runtime(cls, runtime: Runtime) -> AuditLog | None:
        s = runtime.settings
        if s.audit_log is None:
            return None
        return cls(s.audit_log, s.audit_log_max_bytes, s.audit_log_backups, s.secret_values())

    def write(
        self,
        event_type: str,
        *,
        job_id: str | None = None,
        actor: str = "system",
        message: str = "",
        meta: dict[str, Any] | None = None,
        ts: datetime | None = None,
    ) -> None:
        record = {
            "ts": iso(ts or utcnow()),
            "event_type": event_type,
            "job_id": job_id,
            "actor": actor,
            "message": message,
            "meta": meta or {},
        }
        line = json.dumps(mask_value(record, self.masker), ensure_ascii=False, default=str) + "\n"
        # Text from outside (a USER that is not UTF-8, a lone surrogate) is escaped, not fatal.
        data = line.encode("utf-8", "backslashreplace")
        with self._locked():
            self._rotate_if_needed(len(data))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                _append_whole(fd, data)
            finally:
                os.close(fd)

    def on_event(self, row: dict[str, Any]) -> None:
        """A JobStore listener: each committed event row becomes one line. A failed write is a
        service-log warning (at most one a minute), never an error of the job write."""
        created = row.get("created_at")
        try:
            self.write(
                str(row["event_type"]),
                job_id=row.get("job_id"),
                actor=str(row.get("actor") or "system"),
                message=str(row.get("message") or ""),
                meta=dict(row.get("meta") or {}),
                ts=created if isinstance(created, datetime) else None,
            )
        except Exception as exc:
            now = time.monotonic()
            if now - self._last_failure_logged >= 60:
                self._last_failure_logged = now
                log.warning(
                    "audit_write_failed",
                    path=str(self.path),
                    error=getattr(exc, "strerror", None) or type(exc).__name__,
                )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fd = os.open(self._lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def _rotate_if_needed(self, incoming: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0 or size + incoming <= self.max_bytes:
            return
        if self.backups <= 0:
            # Nowhere to keep the old lines: start over, as logging.RotatingFileHandler does.
            os.truncate(self.path, 0)
            return
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


def _append_whole(fd: int, data: bytes) -> None:
    """Appends `data` whole or not at all (the caller holds the lock, so the size is ours). A
    nearly full disk takes part of a write and returns short without an error: the part is cut
    off again, since a line without its end would tear the next one too, and ENOSPC raised."""
    size = os.fstat(fd).st_size
    written = os.write(fd, data)
    if written < len(data):
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise OSError(errno.ENOSPC, f"the audit line was cut after {written} of {len(data)} bytes")


def attached(runtime: Runtime) -> AuditLog | None:
    """The AuditLog that `attach` registered on this runtime, if any."""
    for listener in runtime.jobs.listeners:
        owner = getattr(listener, "__self__", None)
        if isinstance(owner, AuditLog):
            return owner
    return None


def attach(runtime: Runtime) -> AuditLog | None:
    """With RUNNER_AUDIT_LOG set, every event the store commits is also an audit line. Idempotent."""
    existing = attached(runtime)
    if existing is not None:
        return existing
    audit = AuditLog.from_runtime(runtime)
    if audit is not None:
        runtime.jobs.listeners.append(audit.on_event)
    return audit


def audit_event(
    runtime: Runtime,
    event_type: str,
    *,
    actor: str = "system",
    message: str = "",
    meta: dict[str, Any] | None = None,
    job_id: str | None = None,
) -> None:
    """An audit line that is not a job event row (cleanup batches, admin actions). Always also a
    service log line, so there is a trace even without RUNNER_AUDIT_LOG. Never raises: an audit
    sink must not undo the action it records."""
    log.info(event_type, actor=actor, audit_message=message, job_id=job_id, meta=meta or {})
    try:
        # Made here too, not only written: its folder may be impossible to create.
        audit = attached(runtime) or AuditLog.from_runtime(runtime)
        if audit is not None:
            audit.write(event_type, job_id=job_id, actor=actor, message=message, meta=meta)
    except Exception as exc:
        log.warning(
            "audit_write_failed",
            path=str(runtime.settings.audit_log),
            error=getattr(exc, "strerror", None) or type(exc).__name__,
        )


def audit_admin(runtime: Runtime, action: str, actor: str, meta: dict[str, Any] | None = None) -> None:
    """An admin action: `token_created`, `token_revoked`, `credential_set`, `credential_deleted`,
    `credentials_rotated`, … `meta` names what was touched, never a secret."""
    audit_event(runtime, action, actor=actor, message=action.replace("_", " "), meta=meta)
