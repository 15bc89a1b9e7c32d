"""The job model: statuses, the transition table, event types and canonical payload hashing."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCEL_REQUESTED = "cancel_requested"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELED = "canceled"
    TIMEOUT = "timeout"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL: frozenset[Status] = frozenset({Status.SUCCESS, Status.FAILED, Status.CANCELED, Status.TIMEOUT})
ACTIVE: frozenset[Status] = frozenset({Status.QUEUED, Status.RUNNING, Status.CANCEL_REQUESTED})
RUNNING_LIKE: frozenset[Status] = frozenset({Status.RUNNING, Status.CANCEL_REQUESTED})

# SPEC §3: allowed transitions, and no others.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset({Status.RUNNING, Status.CANCELED}),
    Status.RUNNING: frozenset({Status.SUCCESS, Status.FAILED, Status.TIMEOUT, Status.CANCEL_REQUESTED}),
    Status.CANCEL_REQUESTED: frozenset({Status.CANCELED, Status.FAILED}),
    Status.SUCCESS: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELED: frozenset(),
    Status.TIMEOUT: frozenset(),
}


def can_transition(src: Status, dst: Status) -> bool:
    return dst in TRANSITIONS[src]


class EventType(StrEnum):
    JOB_CREATED = "job_created"
    JOB_DEDUPLICATED = "job_deduplicated"
    JOB_STARTED = "job_started"
    JOB_CANCEL_REQUESTED = "job_cancel_requested"
    JOB_CANCELED = "job_canceled"
    JOB_SUCCEEDED = "job_succeeded"
    JOB_FAILED = "job_failed"
    JOB_TIMEOUT = "job_timeout"
    HEARTBEAT_STALE_RECOVERED = "heartbeat_stale_recovered"
    RECOVERED_AFTER_CRASH = "recovered_after_crash"
    STAGE_CHANGED = "stage_changed"
    JOB_CLEANED_UP = "job_cleaned_up"


# The event each status write records, unless the writer names a more specific one.
EVENT_FOR_STATUS: dict[Status, EventType] = {
    Status.RUNNING: EventType.JOB_STARTED,
    Status.CANCEL_REQUESTED: EventType.JOB_CANCEL_REQUESTED,
    Status.CANCELED: EventType.JOB_CANCELED,
    Status.SUCCESS: EventType.JOB_SUCCEEDED,
    Status.FAILED: EventType.JOB_FAILED,
    Status.TIMEOUT: EventType.JOB_TIMEOUT,
}


class ErrorCode(StrEnum):
    SCRIPT_FAILED = "script_failed"
    SPAWN_FAILED = "spawn_failed"
    TIMEOUT = "timeout"
    CANCELED = "canceled"
    RUNNER_SHUTDOWN = "runner_shutdown"
    HEARTBEAT_STALE = "heartbeat_stale"
    RECOVERED_AFTER_CRASH = "recovered_after_crash"
    PREPARE_FAILED = "prepare_failed"
    CLONE_FAILED = "clone_failed"
    BRANCH_FAILED = "branch_failed"
    COMMIT_FAILED = "commit_failed"
    PUSH_FAILED = "push_failed"
    AGENT_FAILED = "agent_failed"
    INTERNAL_ERROR = "internal_error"


#: The form of the runner's ids, job ids (UUID4, store/creates.py) and repo ids (UUID5,
#: `repo_id_for`) alike: a UUID as lowercase dashed text. The process scan reads job ids out of
#: workspace paths in arguments, retention out of file names, the store checks a path's.
ID_PATTERN = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_ID_TEXT = re.compile(ID_PATTERN)


def is_id_text(text: str) -> bool:
    """Whether `text` is an id as the runner writes them (`ID_PATTERN`); `uuid.UUID` would also
    take capitals, bare hex, braces and `urn:uuid:`, which are valid repo names too."""
    return _ID_TEXT.fullmatch(text) is not None


STAGE_NAMES: tuple[str, ...] = ("prepare", "script", "commit", "push", "cleanup")


def canonical_payload(
    repo_id: str, script_key: str, args: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> bytes:
    """SPEC §4: `{repo_id, script_key, args}` with arguments equal to their default left out,
    keys sorted, compact JSON, UTF-8 (non-ASCII kept as is, so one text has one encoding)."""
    defaults = defaults or {}
    kept = {k: v for k, v in args.items() if not (k in defaults and defaults[k] == v)}
    doc = {"args": kept, "repo_id": repo_id, "script_key": script_key}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def payload_hash(
    repo_id: str, script_key: str, args: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> str:
    return hashlib.sha256(canonical_payload(repo_id, script_key, args, defaults)).hexdigest()


def job_branch(job_id: str) -> str:
    """SPEC §6: the job's branch is `runner/<first 8 characters of the job id>`."""
    return f"runner/{job_id[:8]}"
