"""Row → public object conversion, shared by the API, the CLI and the launcher."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from codex_runner.jobs import STAGE_NAMES


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """RFC 3339 UTC with a `Z`, millisecond precision."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def initial_stages() -> list[dict[str, Any]]:
    return [
        {"name": name, "status": "pending", "started_at": None, "finished_at": None, "exit_code": None}
        for name in STAGE_NAMES
    ]


def skipped_stages() -> list[dict[str, Any]]:
    """The stages of a job that ends without running (canceled while queued): none of them will
    run, as a job that ends running marks the stages it did not reach."""
    return [{**stage, "status": "skipped"} for stage in initial_stages()]


def job_to_public(row: Any, *, now: datetime | None = None) -> dict[str, Any]:
    started, finished = row["started_at"], row["finished_at"]
    duration_ms: int | None = None
    if started is not None:
        end = finished or (now or utcnow())
        duration_ms = max(0, int((end - started).total_seconds() * 1000))
    return {
        "id": row["id"],
        "repo_id": row["repo_id"],
        "repo": row["repo"],
        "script_key": row["script_key"],
        "args": row["args"],
        "status": row["status"],
        "requested_by": row["requested_by"],
        "created_at": iso(row["created_at"]),
        "started_at": iso(started),
        "finished_at": iso(finished),
        "heartbeat_at": iso(row["heartbeat_at"]),
        "timeout_seconds": row["timeout_seconds"],
        "exit_code": row["exit_code"],
        "error_code": row["error_code"],
        "error_message": row["error_message"],
        "cancel_requested_at": iso(row["cancel_requested_at"]),
        "runner_id": row["runner_id"],
        "attempt": row["attempt"],
        "duration_ms": duration_ms,
        "stages": row["stages"] or initial_stages(),
        "result": row["result"],
    }


def event_row(
    job_id: str, event_type: str, actor: str, message: str, meta: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """A `runner_job_events` row as inserted (and as handed to the event listeners)."""
    return {
        "job_id": job_id,
        "event_type": event_type,
        "actor": actor,
        "message": message,
        "meta": meta,
        "created_at": now,
    }


def event_to_public(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "job_id": row["job_id"],
        "event_type": row["event_type"],
        "message": row["message"],
        "actor": row["actor"],
        "meta": row["meta"] or {},
        "created_at": iso(row["created_at"]),
    }
