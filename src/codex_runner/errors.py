"""Errors as types. Each carries a machine `code`; the API maps classes to HTTP in one place."""

from __future__ import annotations

from typing import Any


class RunnerError(Exception):
    """Base of every error the runner raises on purpose."""

    code = "runner_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(RunnerError):
    """Bad configuration: the message names the setting and what is wrong."""

    code = "config_error"


class InvalidRequest(RunnerError):
    code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None, errors: list[dict[str, Any]] | None = None):
        super().__init__(message, code=code)
        self.errors = errors or []


class InvalidArgs(InvalidRequest):
    code = "invalid_args"


class UnknownScript(InvalidRequest):
    code = "unknown_script"


class NotAuthenticated(RunnerError):
    code = "not_authenticated"


class Forbidden(RunnerError):
    code = "forbidden"


class RepoNotAllowed(Forbidden):
    code = "repo_not_allowed"


class RepoDisabled(Forbidden):
    code = "repo_disabled"


class NotFound(RunnerError):
    code = "not_found"


class InvalidTransition(RunnerError):
    code = "invalid_transition"


class IdempotencyConflict(RunnerError):
    code = "idempotency_key_reused_with_different_payload"


class LogNotHere(RunnerError):
    """The job's log is in the log folder of the instance that ran it, which this one does not
    share (another host, or another data folder): its content is unknown here, not empty."""

    code = "log_not_here"


class TooManyRequests(RunnerError):
    """429 with a `Retry-After`: a limit that frees up by itself."""

    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after: int = 5, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class QueueFull(TooManyRequests):
    code = "queue_full"


class TooManyStreams(TooManyRequests):
    """A user has RUNNER_MAX_STREAMS_PER_USER log streams open on this instance already."""

    code = "too_many_streams"


class UserQueueFull(QueueFull):
    code = "user_queue_full"


class StoreUnavailable(RunnerError):
    """The database did not answer after the retry budget was spent."""

    code = "unavailable"


class StoreFull(StoreUnavailable):
    """The database's disk is full (SQLite's SQLITE_FULL, PostgreSQL's disk_full). Handled as an
    outage, retried until space comes back; its code stays `unavailable` (SPEC: every 503 says
    `unavailable`), its message says why."""


class CommitOutcomeUnknown(StoreUnavailable):
    """The connection was lost while a write transaction committed: the server may have applied it
    or not. Not retried automatically (a retry could apply it twice); a caller that can check what
    was written (a lease, an idempotency key) may try again. Its code stays `unavailable`
    (SPEC: every 503 says `unavailable`)."""


class InstanceConflict(RunnerError):
    """Another live instance already runs under this RUNNER_ID: starting would have this one's
    recovery kill that one's jobs."""

    code = "instance_conflict"


class LeaseLost(RunnerError):
    """A fenced write found another lease (or none): the writer must stop touching the job."""

    code = "lease_lost"


class CryptoError(RunnerError):
    code = "crypto_error"
