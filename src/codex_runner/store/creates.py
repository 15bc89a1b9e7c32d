"""Group commit of job creation: a batch of creates decided and written in one transaction.

Each item is decided as if it had come alone, after the items before it: the queue caps count the
jobs the batch has accepted so far, and an idempotency key written earlier in the batch is replayed
(or refused) like one already in the table. The caller holds what makes these checks true until
commit: the write lock on SQLite (BEGIN IMMEDIATE), the create advisory lock on PostgreSQL; the
tables' unique constraints still have the last word. Nothing is written until every item is
decided, so a refused item (429, 409) leaves no trace and needs no savepoint."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from codex_runner.errors import IdempotencyConflict, QueueFull, UserQueueFull
from codex_runner.jobs import ACTIVE, EventType, Status
from codex_runner.store.records import event_row, initial_stages, job_to_public, utcnow
from codex_runner.store.schema import all_job_counts, events, idempotency_keys, jobs

if TYPE_CHECKING:
    from codex_runner.store.jobs import Limits, NewJob

# One item's answer: (public job, deduplicated), or why it was refused.
CreateOutcome = tuple[dict[str, Any], bool] | Exception

# Statements built once (SQLAlchemy then skips building them and their cache keys per call).
# What the queue caps need, in one statement (one round trip on PostgreSQL): a row with no user
# and the active jobs of all, then the queued jobs of each user of the batch that has any.
_COUNTS = all_job_counts.c
_CAP_COUNTS = sa.union_all(
    sa.select(sa.null(), sa.func.coalesce(sa.func.sum(_COUNTS.n), 0)).where(
        _COUNTS.status.in_([s.value for s in ACTIVE])
    ),
    sa.select(_COUNTS.requested_by, sa.func.sum(_COUNTS.n))
    .where(
        _COUNTS.status == Status.QUEUED.value,
        _COUNTS.requested_by.in_(sa.bindparam("users", expanding=True)),
    )
    .group_by(_COUNTS.requested_by),
)
_KEY_MATCH = sa.and_(
    idempotency_keys.c.user == sa.bindparam("user"), idempotency_keys.c.key == sa.bindparam("key")
)
_KEY_ROW = sa.select(idempotency_keys).where(_KEY_MATCH)
_DELETE_KEY = idempotency_keys.delete().where(_KEY_MATCH)
_INSERT_KEY = idempotency_keys.insert()
_INSERT_JOB = jobs.insert()
_INSERT_EVENT = events.insert()
_JOB_BY_ID = sa.select(jobs).where(jobs.c.id == sa.bindparam("id"))
_NULL_COLUMNS = {c.name: None for c in jobs.c}


@dataclass
class _Batch:
    limits: Limits
    active: int  # active jobs, the batch's accepted ones included
    queued: dict[str, int]  # queued jobs of each user of the batch, likewise
    # Keys this batch writes: (user, key) -> (payload hash, public job).
    keys: dict[tuple[str, str], tuple[str, dict[str, Any]]] = field(default_factory=dict)
    stale_keys: list[dict[str, str]] = field(default_factory=list)
    job_rows: list[dict[str, Any]] = field(default_factory=list)
    key_rows: list[dict[str, Any]] = field(default_factory=list)
    event_rows: list[dict[str, Any]] = field(default_factory=list)

    def event(
        self, job_id: str, kind: str, actor: str, message: str, meta: dict[str, Any], now: datetime
    ) -> None:
        self.event_rows.append(event_row(job_id, kind, actor, message, meta, now))


def create_in_txn(
    conn: Connection, items: Sequence[NewJob], digests: Sequence[str], limits: Limits
) -> tuple[list[CreateOutcome], list[dict[str, Any]]]:
    """Decides and writes `items` inside the caller's write transaction; returns each item's
    outcome and the event rows written (for the listeners, once committed)."""
    users = sorted({new.requested_by for new in items})
    active, queued = 0, dict[str, int]()
    for user, n in conn.execute(_CAP_COUNTS, {"users": users}):
        if user is None:
            active = int(n)
        else:
            queued[user] = int(n)
    batch = _Batch(limits, active, queued)
    outcomes: list[CreateOutcome] = []
    for new, digest in zip(items, digests, strict=True):
        try:
            outcomes.append(_decide(conn, batch, new, digest, utcnow()))
        except (IdempotencyConflict, QueueFull) as exc:
            outcomes.append(exc)
    # Executemany per table, in the order the foreign keys need.
    if batch.stale_keys:
        conn.execute(_DELETE_KEY, batch.stale_keys)
    if batch.job_rows:
        conn.execute(_INSERT_JOB, batch.job_rows)
    if batch.key_rows:
        conn.execute(_INSERT_KEY, batch.key_rows)
    if batch.event_rows:
        conn.execute(_INSERT_EVENT, batch.event_rows)
    return outcomes, batch.event_rows


def _decide(conn: Connection, batch: _Batch, new: NewJob, digest: str, now: datetime) -> CreateOutcome:
    user, key = new.requested_by, new.idempotency_key
    stale = False
    if key is not None:
        replay, stale = _replay(conn, batch, new, digest, now)
        if replay is not None:
            return replay, True
    _check_caps(batch, user)
    job_id = str(uuid.uuid4())
    row = {
        "id": job_id,
        "repo_id": new.repo_id,
        "repo": new.repo_name,
        "workspace_mode": new.workspace_mode,
        "script_key": new.script_key,
        "args": dict(new.args),
        "status": Status.QUEUED.value,
        "requested_by": user,
        "created_at": now,
        "timeout_seconds": new.timeout_seconds,
        "attempt": 0,
        "stages": initial_stages(),
    }
    public = job_to_public({**_NULL_COLUMNS, **row}, now=now)
    batch.job_rows.append(row)
    batch.active += 1
    batch.queued[user] = batch.queued.get(user, 0) + 1
    meta = {"script_key": new.script_key, "repo": new.repo_name}
    if key is not None:
        if stale:
            batch.stale_keys.append({"user": user, "key": key})
        batch.key_rows.append(
            {
                "user": user,
                "key": key,
                "payload_hash": digest,
                "job_id": job_id,
                "created_at": now,
                "expires_at": now + timedelta(seconds=batch.limits.idempotency_window_seconds),
            }
        )
        batch.keys[(user, key)] = (digest, public)
        # Which key and which payload, without the key itself (a client's key may carry meaning).
        meta["idempotency_key_sha256"] = hashlib.sha256(key.encode()).hexdigest()[:16]
        meta["payload_sha256"] = digest[:16]
    batch.event(job_id, EventType.JOB_CREATED, user, "job created", meta, now)
    return public, False


def _replay(
    conn: Connection, batch: _Batch, new: NewJob, digest: str, now: datetime
) -> tuple[dict[str, Any] | None, bool]:
    """(the earlier job of this key and payload, or None; whether the key's row is stale: expired,
    or its job removed by retention, so free again and to be replaced)."""
    user, key = new.requested_by, new.idempotency_key
    assert key is not None
    earlier = batch.keys.get((user, key))
    if earlier is not None:
        known_digest, job = earlier
    else:
        key_row = conn.execute(_KEY_ROW, {"user": user, "key": key}).mappings().first()
        if key_row is None:
            return None, False
        job_row = conn.execute(_JOB_BY_ID, {"id": key_row["job_id"]}).mappings().first()
        if key_row["expires_at"] <= now or job_row is None:
            return None, True
        known_digest, job = key_row["payload_hash"], job_to_public(job_row, now=now)
    if known_digest != digest:
        raise IdempotencyConflict(
            "this Idempotency-Key was already used with a different payload; use a new key"
        )
    batch.event(job["id"], EventType.JOB_DEDUPLICATED, user, "idempotent replay", {}, now)
    return job, False


def _check_caps(batch: _Batch, user: str) -> None:
    limits = batch.limits
    if batch.active >= limits.max_queue_size:
        raise QueueFull(
            f"the queue is full ({batch.active} active jobs, limit {limits.max_queue_size}); retry later"
        )
    queued = batch.queued.get(user, 0)
    if queued >= limits.max_queued_per_user:
        raise UserQueueFull(
            f"you have {queued} queued jobs (limit {limits.max_queued_per_user}); retry when some have started"
        )
