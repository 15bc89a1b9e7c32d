"""The audit log: one JSON object per line, size rotation, several writers, no secrets."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from codex_runner.ops.audit import AuditLog

KEYS = {"ts", "event_type", "job_id", "actor", "message", "meta"}


def _lines(*paths: Path) -> list[dict]:
    out = []
    for p in paths:
        if p.exists():
            out += [json.loads(line) for line in p.read_text().splitlines()]
    return out


def test_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    audit = AuditLog(path, 1024 * 1024, 3)
    audit.write("job_created", job_id="j1", actor="alice", message="job created", meta={"repo": "r"})
    audit.on_event(
        {"job_id": "j2", "event_type": "job_started", "actor": "system", "message": "", "meta": {}}
    )
    rows = _lines(path)
    assert [set(r) for r in rows] == [KEYS, KEYS]
    assert rows[0]["event_type"] == "job_created" and rows[0]["meta"] == {"repo": "r"}
    assert rows[1]["job_id"] == "j2" and rows[1]["ts"].endswith("Z")
    assert path.stat().st_mode & 0o777 == 0o600


def test_rotation_keeps_backups_and_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, 1024, 2)
    for i in range(100):
        audit.write("admin", message=f"line {i:03d}", meta={"pad": "x" * 40})
    files = [path.with_name("audit.jsonl.2"), path.with_name("audit.jsonl.1"), path]
    assert all(f.exists() for f in files)
    assert not path.with_name("audit.jsonl.3").exists()
    assert all(f.stat().st_size <= 1024 for f in files)
    numbers = [int(r["message"].split()[1]) for r in _lines(*files)]
    # The newest lines survive, in order, with none missing in between.
    assert numbers == list(range(numbers[0], 100))
    assert numbers[0] > 0


def test_no_backups_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, 1024, 0)
    for i in range(50):
        audit.write("admin", message=f"line {i}")
    assert path.stat().st_size <= 1024
    assert not path.with_name("audit.jsonl.1").exists()
    assert _lines(path)[-1]["message"] == "line 49"


def _writer(path: str, n: int, tag: str) -> None:
    audit = AuditLog(Path(path), 4096, 100)
    for i in range(n):
        audit.write("admin", actor=tag, message=str(i), meta={"pad": "y" * 30})


def test_several_processes_lose_no_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), 150, f"p{i}")) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    files = [path, *sorted(tmp_path.glob("audit.jsonl.*"))]
    files = [f for f in files if not f.name.endswith(".lock")]
    rows = _lines(*files)  # every line parses: no interleaved writes
    assert len(rows) == 600
    for tag in ("p0", "p1", "p2", "p3"):
        assert sorted(int(r["message"]) for r in rows if r["actor"] == tag) == list(range(150))


def test_known_secrets_are_masked(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, 1024 * 1024, 1, secrets=["s3cr3t-value-123"])
    audit.write("credential_set", message="set s3cr3t-value-123", meta={"nested": ["s3cr3t-value-123"]})
    text = path.read_text()
    assert "s3cr3t-value-123" not in text
    assert "[REDACTED]" in text


def test_service_logs_are_json_and_masked(tmp_path: Path) -> None:
    import io
    import logging

    import structlog

    from codex_runner.config import load_settings
    from codex_runner.ops.logging import configure_logging

    secret = "jwt-secret-0123456789"
    settings = load_settings({"RUNNER_DATA_DIR": str(tmp_path), "RUNNER_JWT_SECRET": secret}, cwd=tmp_path)
    stream = io.StringIO()
    try:
        configure_logging(settings, stream=stream)
        with structlog.contextvars.bound_contextvars(job_id="j1"):
            structlog.get_logger("codex_runner.job").info(
                "job_finished", status_from="running", status_to="success", detail=f"token {secret}"
            )
        logging.getLogger("uvicorn.error").warning("stdlib line with %s", secret)
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["job_finished", "stdlib line with [REDACTED]"]
    assert lines[0]["job_id"] == "j1" and lines[0]["status_to"] == "success" and lines[0]["level"] == "info"
    assert lines[1]["logger"] == "uvicorn.error" and "ts" in lines[1]
    assert secret not in stream.getvalue()


def test_service_log_levels_and_exceptions(tmp_path: Path) -> None:
    """The runner's own lines skip the standard library's machinery but keep its rules: the
    configured level filters them, an exception is rendered into the line, and they interleave
    with the standard library's lines on one stream, one JSON object per line."""
    import io
    import logging

    import structlog

    from codex_runner.config import load_settings
    from codex_runner.ops.logging import configure_logging

    settings = load_settings({"RUNNER_DATA_DIR": str(tmp_path)}, cwd=tmp_path)
    stream = io.StringIO()
    try:
        configure_logging(settings, stream=stream, level=logging.WARNING)
        log = structlog.get_logger("codex_runner.launcher")
        log.info("not_shown")
        log.warning("shown", n=1)
        logging.getLogger("alembic").info("not shown either")
        logging.getLogger("alembic").warning("stdlib %s", "warning")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed_here")
        log.warning("positional %s", "argument")
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["event"], line["logger"], line["level"]) for line in lines] == [
        ("shown", "codex_runner.launcher", "warning"),
        ("stdlib warning", "alembic", "warning"),
        ("failed_here", "codex_runner.launcher", "error"),
        ("positional argument", "codex_runner.launcher", "warning"),
    ]
    assert "RuntimeError: boom" in lines[2]["exception"]


def test_service_log_lines_survive_a_closed_stream(tmp_path: Path) -> None:
    """As the standard library's handler does, a stream that is gone never fails the caller."""
    import io

    import structlog

    from codex_runner.config import load_settings
    from codex_runner.ops.logging import configure_logging

    settings = load_settings({"RUNNER_DATA_DIR": str(tmp_path)}, cwd=tmp_path)
    stream = io.StringIO()
    try:
        configure_logging(settings, stream=stream)
        stream.close()
        structlog.get_logger("codex_runner.job").info("into_the_void")
    finally:
        import logging

        logging.getLogger().handlers.clear()
        structlog.reset_defaults()


def test_an_audit_log_that_cannot_be_made_never_undoes_the_action(tmp_path: Path) -> None:
    """`audit_event` never raises: an audit log under a file (its folder cannot be made) is a
    warning, not a failed admin command whose token was made but never shown."""
    from types import SimpleNamespace

    from codex_runner.ops.audit import audit_event

    (tmp_path / "notadir").write_text("a file")
    settings = SimpleNamespace(
        audit_log=tmp_path / "notadir" / "audit.log",
        audit_log_max_bytes=1024,
        audit_log_backups=1,
        secret_values=lambda: [],
    )
    runtime = SimpleNamespace(settings=settings, jobs=SimpleNamespace(listeners=[]))
    audit_event(runtime, "token_created", actor="admin", meta={"user": "bob"})  # type: ignore[arg-type]


def test_an_audit_log_whose_folder_cannot_be_made_names_the_setting(tmp_path: Path) -> None:
    """The folder's `mkdir` raised FileExistsError as is: `serve` stopped with `error: unexpected
    FileExistsError`, naming no setting."""
    import pytest

    from codex_runner.errors import ConfigError

    (tmp_path / "notadir").write_text("a file")
    path = tmp_path / "notadir" / "audit.jsonl"
    with pytest.raises(ConfigError) as exc:
        AuditLog(path)
    assert exc.value.message == (
        f"RUNNER_AUDIT_LOG: cannot write the audit log {path}: a file is in the way of its folder"
    )


def test_a_job_events_failed_audit_write_is_logged_once_a_minute(tmp_path: Path) -> None:
    """Job-event audit lines failed silently (admin actions logged `audit_write_failed`): an audit
    log that stops working must show in the service log."""
    from structlog.testing import capture_logs

    audit = AuditLog(tmp_path / "audit" / "audit.jsonl")
    (tmp_path / "audit" / "audit.jsonl").mkdir()  # a folder where the file should be: every write fails
    row = {"event_type": "job_created", "job_id": "j", "actor": "alice", "message": "m", "meta": {}}
    with capture_logs() as logs:
        for _ in range(3):
            audit.on_event(row)  # never raises into the job write
    assert [e["event"] for e in logs] == ["audit_write_failed"]


def test_text_that_is_not_utf8_is_escaped_not_fatal(tmp_path: Path) -> None:
    """A USER that is not UTF-8 reached the audit line as a lone surrogate, and the write raised
    UnicodeEncodeError (after the admin action it recorded)."""
    path = tmp_path / "audit.jsonl"
    AuditLog(path).write("token_revoked", actor="cli:ops\udcff", message="token revoked")
    assert json.loads(path.read_text())["actor"].startswith("cli:ops")


def test_the_cli_actor_is_known_without_a_passwd_entry(monkeypatch: object) -> None:
    """`getpass.getuser()` raises in a container whose uid has no passwd entry and no USER: the
    admin command failed after its change was made (a token created, never printed)."""
    import getpass
    import os

    from codex_runner.cli import admin

    def no_user() -> str:
        raise KeyError("getpwuid(): uid not found: 12345")

    monkeypatch.setattr(getpass, "getuser", no_user)  # type: ignore[attr-defined]
    assert admin.cli_actor() == f"cli:uid:{os.getuid()}"
