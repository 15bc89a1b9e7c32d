"""SQLAlchemy Core schema. Alembic migrations under `migrations/` must produce exactly this."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC: one representation on both backends, so string
    comparison on SQLite and timestamp comparison on PostgreSQL order the same way."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC)


# The PostgreSQL server's clock, in UTC, naive like the stored times (see `UTCDateTime`).
SERVER_CLOCK = sa.func.timezone("UTC", sa.func.clock_timestamp(), type_=UTCDateTime)


def clock_now(is_pg: bool) -> Any:
    """Now, for the times instances compare with each other's (heartbeats, the stale threshold,
    live instances): the PostgreSQL server's clock, so that no host's skew makes a watchdog fail
    live jobs or keep dead ones; this host's on SQLite, which one host shares. A SQL expression on
    PostgreSQL, a value on SQLite; either goes into `.values()` or a comparison."""
    return SERVER_CLOCK if is_pg else datetime.now(UTC)


def clock_cutoff(is_pg: bool, seconds: float) -> Any:
    """`clock_now` minus `seconds`."""
    ago = timedelta(seconds=seconds)
    # On PostgreSQL an interval bind: the clock's own type would take the timedelta for a time.
    return clock_now(is_pg) - (sa.literal(ago, sa.Interval()) if is_pg else ago)


class CleanText(TypeDecorator[str]):
    """Text from outside the runner (a script's stderr, an agent's or git's message): PostgreSQL
    refuses the NUL character in text, and a write it refuses would leave the job without its
    terminal status, so NUL is stored as U+FFFD, on both backends alike."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is not None and "\x00" in value:
            return value.replace("\x00", "\ufffd")
        return value


ACTIVE_STATUSES = ("queued", "running", "cancel_requested")

repos = sa.Table(
    "runner_repos",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("source_type", sa.String(20), nullable=False),
    sa.Column("path_or_url", sa.Text, nullable=False),
    sa.Column("branch", sa.String(255), nullable=False),
    sa.Column("workspace", sa.String(20), nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False, default=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

jobs = sa.Table(
    "runner_jobs",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("repo_id", sa.String(36), nullable=False),
    sa.Column("repo", sa.String(200), nullable=False),
    sa.Column("workspace_mode", sa.String(20), nullable=False),
    sa.Column("script_key", sa.String(200), nullable=False),
    sa.Column("args", sa.JSON, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("requested_by", sa.String(200), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("heartbeat_at", UTCDateTime),
    sa.Column("timeout_seconds", sa.Integer, nullable=False),
    sa.Column("exit_code", sa.Integer),
    sa.Column("error_code", sa.String(64)),
    sa.Column("error_message", CleanText),
    sa.Column("cancel_requested_at", UTCDateTime),
    sa.Column("runner_id", sa.String(200)),
    sa.Column("lease_token", sa.String(64)),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("stages", sa.JSON),
    sa.Column("result", sa.JSON),
    # Recorded at spawn so a later life of the same runner can kill exactly this group and never
    # a recycled pid (SPEC §3 start-up recovery).
    sa.Column("pid", sa.Integer),
    sa.Column("pgid", sa.Integer),
    sa.Column("proc_start_time", sa.BigInteger),
    # Queue scans: only queued rows are in this index, so it stays small however big the table.
    sa.Index(
        "ix_runner_jobs_queue",
        "created_at",
        "id",
        sqlite_where=sa.text("status = 'queued'"),
        postgresql_where=sa.text("status = 'queued'"),
    ),
    # Limits and watchdog: active rows by runner, by repo; by user through `status_created` below.
    sa.Index("ix_runner_jobs_runner_status", "runner_id", "status"),
    sa.Index("ix_runner_jobs_repo_status", "repo_id", "status"),
    # Lists: newest first, optionally per user / repo / status.
    sa.Index("ix_runner_jobs_created", "created_at", "id"),
    sa.Index("ix_runner_jobs_user_created", "requested_by", "created_at", "id"),
    sa.Index("ix_runner_jobs_user_status_created", "requested_by", "status", "created_at", "id"),
    sa.Index("ix_runner_jobs_status_created", "status", "created_at", "id"),
    sa.Index("ix_runner_jobs_repo_created", "repo_id", "created_at", "id"),
    sa.Index("ix_runner_jobs_finished", "finished_at"),
)

# Exact job counts per (status, user, repo): list totals and queue caps read a few hundred rows here
# instead of counting a million jobs. Kept by triggers on `runner_jobs` (migration 0002) in the same
# transaction as every insert, status change and delete, whatever code writes. A migration that
# rebuilds `runner_jobs` (SQLite batch mode copies the table) drops them and must create them again.
job_counts = sa.Table(
    "runner_job_counts",
    metadata,
    sa.Column("status", sa.String(20), primary_key=True),
    sa.Column("requested_by", sa.String(200), primary_key=True),
    sa.Column("repo_id", sa.String(36), primary_key=True),
    sa.Column("n", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
    sa.Index("ix_runner_job_counts_user", "requested_by", "status"),
)

# Changes to those counts not yet folded into them (PostgreSQL; migration 0004): there the triggers
# append a row per change here instead of updating a counts row in place, which locked hot rows in
# every writer's own order and deadlocked; `JobStore.fold_counts` moves them over. Empty on SQLite.
job_count_deltas = sa.Table(
    "runner_job_count_deltas",
    metadata,
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("requested_by", sa.String(200), nullable=False),
    sa.Column("repo_id", sa.String(36), nullable=False),
    sa.Column("n", sa.Integer, nullable=False),
)

# What every reader of the counts reads: the counts rows and the deltas not yet folded, one row
# each (sum `n` per key, filtered as on `job_counts`).
all_job_counts = sa.union_all(
    sa.select(job_counts.c.status, job_counts.c.requested_by, job_counts.c.repo_id, job_counts.c.n),
    sa.select(
        job_count_deltas.c.status,
        job_count_deltas.c.requested_by,
        job_count_deltas.c.repo_id,
        job_count_deltas.c.n,
    ),
).subquery("all_job_counts")

events = sa.Table(
    "runner_job_events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(36), sa.ForeignKey("runner_jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("event_type", sa.String(64), nullable=False),
    sa.Column("message", CleanText, nullable=False, default=""),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("meta", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_runner_job_events_job", "job_id", "id"),
)

tokens = sa.Table(
    "runner_api_tokens",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("user", sa.String(200), nullable=False),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("name", sa.String(200), nullable=False, default=""),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime),
)

credentials = sa.Table(
    "runner_credentials",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("username", sa.String(200), nullable=False),
    sa.Column("secret_enc", sa.LargeBinary, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

idempotency_keys = sa.Table(
    "runner_idempotency_keys",
    metadata,
    sa.Column("user", sa.String(200), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("payload_hash", sa.String(64), nullable=False),
    sa.Column("job_id", sa.String(36), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Index("ix_runner_idempotency_keys_expires", "expires_at"),
)

instances = sa.Table(
    "runner_instances",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("version", sa.String(40), nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("heartbeat_at", UTCDateTime, nullable=False),
    sa.Column("stopped_at", UTCDateTime),
)

# Named, expiring locks for singleton chores (retention): one instance at a time.
locks = sa.Table(
    "runner_locks",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
)
