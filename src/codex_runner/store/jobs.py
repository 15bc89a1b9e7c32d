"""JobStore: every read and write of jobs and their events. Status writes are compare-and-set on
the current status (and, for the owning instance, on its lease), with the event row in the same
transaction."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from codex_runner.errors import (
    IdempotencyConflict,
    InvalidTransition,
    NotFound,
    QueueFull,
    UserQueueFull,
)
from codex_runner.jobs import (
    ACTIVE,
    EVENT_FOR_STATUS,
    RUNNING_LIKE,
    TERMINAL,
    EventType,
    Status,
    can_transition,
    payload_hash,
)
from codex_runner.store.engine import read_txn, with_retries, write_txn
from codex_runner.store.records import event_to_public, initial_stages, iso, job_to_public, utcnow
from codex_runner.store.schema import events, idempotency_keys, instances, job_counts, jobs, repos

# Advisory lock keys (PostgreSQL): one serialises claims, one serialises creates so that the
# queue caps hold across instances.
CLAIM_LOCK_KEY = 0x636F646578_01
CREATE_LOCK_KEY = 0x636F646578_02

EventListener = Callable[[dict[str, Any]], None]

# Statements of the hot paths (create, get), built once: SQLAlchemy then skips building them and
# their cache keys on every call.
_CREATE_LOCK = sa.select(sa.func.pg_advisory_xact_lock(CREATE_LOCK_KEY))
_INSERT_JOB = jobs.insert()
_INSERT_EVENT = events.insert()
_JOB_BY_ID = sa.select(jobs).where(jobs.c.id == sa.bindparam("id"))
_JOB_BY_ID_OWNED = _JOB_BY_ID.where(jobs.c.requested_by == sa.bindparam("owner"))
_EVENTS_OF_JOB = sa.select(events).where(events.c.job_id == sa.bindparam("job_id")).order_by(events.c.id)

# Queue caps from the counts table: (active jobs, queued jobs of :user), a range of the primary key.
_LIMIT_COUNTS = sa.select(
    sa.func.coalesce(sa.func.sum(job_counts.c.n), 0),
    sa.func.coalesce(
        sa.func.sum(
            sa.case(
                (
                    sa.and_(
                        job_counts.c.status == Status.QUEUED.value,
                        job_counts.c.requested_by == sa.bindparam("user"),
                    ),
                    job_counts.c.n,
                ),
                else_=0,
            )
        ),
        0,
    ),
).where(job_counts.c.status.in_([s.value for s in ACTIVE]))


@dataclass(frozen=True)
class NewJob:
    repo_id: str
    repo_name: str
    workspace_mode: str
    script_key: str
    args: Mapping[str, Any]
    defaults: Mapping[str, Any]
    timeout_seconds: int
    requested_by: str
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Limits:
    max_queue_size: int = 200
    max_queued_per_user: int = 20
    idempotency_window_seconds: int = 86400


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    lease_token: str
    row: dict[str, Any]


@dataclass
class _PendingEvent:
    job_id: str
    event_type: str
    actor: str
    message: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


class JobStore:
    """The single owner of job SQL. Thread-safe: each call uses its own connection."""

    def __init__(self, engine: Engine, *, listeners: Sequence[EventListener] = ()) -> None:
        self.engine = engine
        self.is_pg = engine.dialect.name == "postgresql"
        self.listeners: list[EventListener] = list(listeners)

    # -- events -----------------------------------------------------------------------------

    def _insert_events(self, conn: Connection, pending: Iterable[_PendingEvent], now: datetime) -> list[dict]:
        rows = [
            {
                "job_id": e.job_id,
                "event_type": e.event_type,
                "actor": e.actor,
                "message": e.message,
                "meta": e.meta,
                "created_at": now,
            }
            for e in pending
        ]
        if rows:
            conn.execute(_INSERT_EVENT, rows)
        return rows

    def _notify(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            for listener in self.listeners:
                # An audit or metrics sink must never break a job write.
                with contextlib.suppress(Exception):
                    listener(row)

    def add_event(
        self,
        job_id: str,
        event_type: str,
        *,
        actor: str = "system",
        message: str = "",
        meta: dict | None = None,
    ) -> None:
        def txn() -> list[dict]:
            with write_txn(self.engine) as conn:
                return self._insert_events(
                    conn, [_PendingEvent(job_id, event_type, actor, message, meta or {})], utcnow()
                )

        self._notify(with_retries(txn))

    # -- create -----------------------------------------------------------------------------

    def create(self, new: NewJob, limits: Limits) -> tuple[dict[str, Any], bool]:
        """Creates a queued job, or replays the job of an earlier request with the same
        idempotency key and payload. Returns (public job, deduplicated)."""
        digest = payload_hash(new.repo_id, new.script_key, new.args, new.defaults)

        def txn() -> tuple[dict[str, Any], bool, list[dict]]:
            now = utcnow()
            with write_txn(self.engine) as conn:
                if self.is_pg:
                    conn.execute(_CREATE_LOCK)
                if new.idempotency_key is not None:
                    replay = self._replay(conn, new, digest, now)
                    if replay is not None:
                        return replay
                self._check_limits(conn, new.requested_by, limits)
                job_id = str(uuid.uuid4())
                row = {
                    "id": job_id,
                    "repo_id": new.repo_id,
                    "repo": new.repo_name,
                    "workspace_mode": new.workspace_mode,
                    "script_key": new.script_key,
                    "args": dict(new.args),
                    "status": Status.QUEUED.value,
                    "requested_by": new.requested_by,
                    "created_at": now,
                    "timeout_seconds": new.timeout_seconds,
                    "attempt": 0,
                    "stages": initial_stages(),
                }
                conn.execute(_INSERT_JOB, row)
                meta = {"script_key": new.script_key, "repo": new.repo_name}
                if new.idempotency_key is not None:
                    conn.execute(
                        idempotency_keys.insert(),
                        {
                            "user": new.requested_by,
                            "key": new.idempotency_key,
                            "payload_hash": digest,
                            "job_id": job_id,
                            "created_at": now,
                            "expires_at": now + timedelta(seconds=limits.idempotency_window_seconds),
                        },
                    )
                    meta["idempotency_key_sha256"] = digest[:16]
                ev = self._insert_events(
                    conn,
                    [_PendingEvent(job_id, EventType.JOB_CREATED, new.requested_by, "job created", meta)],
                    now,
                )
                full = {
                    **row,
                    **{c.name: None for c in jobs.c if c.name not in row},
                }
                return job_to_public(full, now=now), False, ev

        job, dedup, ev = with_retries(txn)
        self._notify(ev)
        return job, dedup

    def _replay(
        self, conn: Connection, new: NewJob, digest: str, now: datetime
    ) -> tuple[dict[str, Any], bool, list[dict]] | None:
        key_row = (
            conn.execute(
                sa.select(idempotency_keys).where(
                    idempotency_keys.c.user == new.requested_by, idempotency_keys.c.key == new.idempotency_key
                )
            )
            .mappings()
            .first()
        )
        if key_row is None:
            return None
        job_row = conn.execute(sa.select(jobs).where(jobs.c.id == key_row["job_id"])).mappings().first()
        if key_row["expires_at"] <= now or job_row is None:
            # Expired, or its job was removed by retention: the key is free again.
            conn.execute(
                idempotency_keys.delete().where(
                    idempotency_keys.c.user == new.requested_by, idempotency_keys.c.key == new.idempotency_key
                )
            )
            return None
        if key_row["payload_hash"] != digest:
            raise IdempotencyConflict(
                "this Idempotency-Key was already used with a different payload; use a new key"
            )
        ev = self._insert_events(
            conn,
            [_PendingEvent(job_row["id"], EventType.JOB_DEDUPLICATED, new.requested_by, "idempotent replay")],
            now,
        )
        return job_to_public(job_row, now=now), True, ev

    def _check_limits(self, conn: Connection, user: str, limits: Limits) -> None:
        active, queued = conn.execute(_LIMIT_COUNTS, {"user": user}).one()
        if active >= limits.max_queue_size:
            raise QueueFull(
                f"the queue is full ({active} active jobs, limit {limits.max_queue_size}); retry later"
            )
        if queued >= limits.max_queued_per_user:
            raise UserQueueFull(
                f"you have {queued} queued jobs (limit {limits.max_queued_per_user}); retry when some have started"
            )

    # -- read -------------------------------------------------------------------------------

    def get(self, job_id: str, *, owner: str | None = None, with_events: bool = False) -> dict[str, Any]:
        """One job; `owner` set means "as this user": another user's job is NotFound."""

        def txn() -> dict[str, Any]:
            with read_txn(self.engine) as conn:
                row = self._get_row(conn, job_id, owner)
                job = job_to_public(row)
                if with_events:
                    job["events"] = self._events(conn, job_id)
                return job

        return with_retries(txn)

    def get_row(self, job_id: str) -> dict[str, Any] | None:
        """The raw row, for the launcher (includes the lease and process fields)."""

        def txn() -> dict[str, Any] | None:
            with read_txn(self.engine) as conn:
                row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().first()
                return dict(row) if row else None

        return with_retries(txn)

    def _get_row(self, conn: Connection, job_id: str, owner: str | None) -> Any:
        if owner is None:
            row = conn.execute(_JOB_BY_ID, {"id": job_id}).mappings().first()
        else:
            row = conn.execute(_JOB_BY_ID_OWNED, {"id": job_id, "owner": owner}).mappings().first()
        if row is None:
            raise NotFound(f"job {job_id} not found")
        return row

    def _events(self, conn: Connection, job_id: str) -> list[dict[str, Any]]:
        rows = conn.execute(_EVENTS_OF_JOB, {"job_id": job_id}).mappings()
        return [event_to_public(r) for r in rows]

    def events(self, job_id: str, *, owner: str | None = None) -> list[dict[str, Any]]:
        def txn() -> list[dict[str, Any]]:
            with read_txn(self.engine) as conn:
                self._get_row(conn, job_id, owner)
                return self._events(conn, job_id)

        return with_retries(txn)

    def list_jobs(
        self,
        *,
        owner: str | None = None,
        statuses: Sequence[str] = (),
        repo_id: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[dict[str, Any]], int]:
        """Newest first, with the total count of matching jobs."""
        conds: list[sa.ColumnElement[bool]] = []
        # The total comes from the counts table (kept exact by triggers), which has every column
        # a list can filter on: a million-row COUNT(*) becomes a sum over a few hundred rows.
        count_conds: list[sa.ColumnElement[bool]] = []
        if owner is not None:
            conds.append(jobs.c.requested_by == owner)
            count_conds.append(job_counts.c.requested_by == owner)
        if statuses:
            conds.append(jobs.c.status.in_(list(statuses)))
            count_conds.append(job_counts.c.status.in_(list(statuses)))
        if repo_id is not None:
            conds.append(jobs.c.repo_id == repo_id)
            count_conds.append(job_counts.c.repo_id == repo_id)

        def txn() -> tuple[list[dict[str, Any]], int]:
            with read_txn(self.engine) as conn:
                rows = conn.execute(
                    sa.select(jobs)
                    .where(*conds)
                    .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
                    .limit(limit)
                    .offset(offset)
                ).mappings()
                now = utcnow()
                items = [job_to_public(r, now=now) for r in rows]
                total = conn.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(job_counts.c.n), 0)).where(*count_conds)
                ).scalar_one()
                return items, int(total)

        return with_retries(txn)

    def counts_by_status(self) -> dict[str, int]:
        def txn() -> dict[str, int]:
            with read_txn(self.engine) as conn:
                rows = conn.execute(
                    sa.select(jobs.c.status, sa.func.count())
                    .where(jobs.c.status.in_([s.value for s in ACTIVE]))
                    .group_by(jobs.c.status)
                ).all()
                return {status: int(n) for status, n in rows}

        return with_retries(txn)

    # -- transitions ------------------------------------------------------------------------

    def transition(
        self,
        job_id: str,
        src: Status | Iterable[Status],
        dst: Status,
        *,
        lease_token: str | None = None,
        actor: str = "system",
        event_type: str | None = None,
        message: str = "",
        meta: dict[str, Any] | None = None,
        values: Mapping[str, Any] | None = None,
        runner_id: str | None = None,
        heartbeat_before: datetime | None = None,
    ) -> bool:
        """Compare-and-set: moves the job from one of `src` to `dst` only if it is still there
        (and still holds `lease_token`, when given). Returns False and writes nothing otherwise."""
        sources = [src] if isinstance(src, Status) else list(src)
        allowed = [s for s in sources if can_transition(s, dst)]
        if not allowed:
            raise InvalidTransition(f"no transition from {', '.join(sources)} to {dst}")

        def txn() -> list[dict] | None:
            now = utcnow()
            with write_txn(self.engine) as conn:
                return self._cas(
                    conn,
                    job_id,
                    allowed,
                    dst,
                    lease_token,
                    now,
                    actor,
                    event_type,
                    message,
                    meta,
                    values,
                    runner_id=runner_id,
                    heartbeat_before=heartbeat_before,
                )

        ev = with_retries(txn)
        if ev is None:
            return False
        self._notify(ev)
        return True

    def _cas(
        self,
        conn: Connection,
        job_id: str,
        allowed: Sequence[Status],
        dst: Status,
        lease_token: str | None,
        now: datetime,
        actor: str,
        event_type: str | None,
        message: str,
        meta: dict[str, Any] | None,
        values: Mapping[str, Any] | None,
        *,
        runner_id: str | None = None,
        heartbeat_before: datetime | None = None,
    ) -> list[dict] | None:
        update: dict[str, Any] = dict(values or {})
        update["status"] = dst.value
        if dst in TERMINAL:
            update.setdefault("finished_at", now)
        if dst is Status.CANCEL_REQUESTED:
            update.setdefault("cancel_requested_at", now)
        conds = [jobs.c.id == job_id, jobs.c.status.in_([s.value for s in allowed])]
        if lease_token is not None:
            conds.append(jobs.c.lease_token == lease_token)
        if runner_id is not None:
            conds.append(jobs.c.runner_id == runner_id)
        if heartbeat_before is not None:
            # The watchdog's write holds only if the owner has not heartbeated since it looked.
            conds.append(jobs.c.heartbeat_at < heartbeat_before)
        result = conn.execute(jobs.update().where(*conds).values(**update))
        if result.rowcount != 1:
            return None
        return self._insert_events(
            conn,
            [_PendingEvent(job_id, event_type or EVENT_FOR_STATUS[dst], actor, message, meta or {})],
            now,
        )

    def cancel(self, job_id: str, *, owner: str | None, actor: str) -> tuple[dict[str, Any], int]:
        """SPEC §4 cancel: queued → 200 canceled; running → 202 cancel_requested; already
        cancel_requested → 202; other terminal → InvalidTransition (409)."""

        def txn() -> tuple[dict[str, Any], int, list[dict]]:
            now = utcnow()
            with write_txn(self.engine) as conn:
                row = self._get_row(conn, job_id, owner)
                status = Status(row["status"])
                ev: list[dict] | None = []
                code = 202
                if status is Status.QUEUED:
                    ev = self._cas(
                        conn,
                        job_id,
                        [status],
                        Status.CANCELED,
                        None,
                        now,
                        actor,
                        None,
                        "canceled while queued",
                        {"error_code": "canceled"},
                        {"error_code": "canceled"},
                    )
                    code = 200
                elif status is Status.RUNNING:
                    ev = self._cas(
                        conn,
                        job_id,
                        [status],
                        Status.CANCEL_REQUESTED,
                        None,
                        now,
                        actor,
                        None,
                        "cancel requested",
                        None,
                        None,
                    )
                elif status is Status.CANCEL_REQUESTED:
                    ev = []
                else:
                    raise InvalidTransition(f"job {job_id} is already {status.value}")
                if ev is None:  # pragma: no cover - impossible under the write lock
                    raise InvalidTransition(f"job {job_id} changed while canceling; retry")
                fresh = self._get_row(conn, job_id, None)
                return job_to_public(fresh, now=now), code, ev

        job, code, ev = with_retries(txn)
        self._notify(ev)
        return job, code

    # -- launcher side ----------------------------------------------------------------------

    def claim(
        self,
        runner_id: str,
        *,
        slots: int,
        max_jobs_per_user: int,
        scan: int | None = None,
    ) -> list[ClaimedJob]:
        """Claims up to `slots` queued jobs, FIFO by (created_at, id), skipping users at their
        running limit and `in_place` repos that already have an active job. One transaction, under
        the claim lock, so the limits hold across instances."""
        if slots <= 0:
            return []
        # A few candidates per free slot: users at their limit are filtered in SQL, so a page
        # this size nearly always fills the slots; the keyset loop fetches more when it does not.
        page = scan or min(200, max(16, slots * 4))

        def txn() -> tuple[list[ClaimedJob], list[dict]]:
            with write_txn(self.engine) as conn:
                if self.is_pg:
                    # A frozen instance holding a row lock must not stall claims cluster-wide.
                    conn.execute(sa.text("SET LOCAL lock_timeout = '5s'"))
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(CLAIM_LOCK_KEY)))
                # After the lock: started_at must not predate the wait for it.
                now = utcnow()
                running: dict[str, int] = dict(
                    conn.execute(
                        sa.select(jobs.c.requested_by, sa.func.count())
                        .where(jobs.c.status.in_([s.value for s in RUNNING_LIKE]))
                        .group_by(jobs.c.requested_by)
                    ).all()
                )
                busy_repos = set(
                    conn.execute(
                        sa.select(jobs.c.repo_id)
                        .where(
                            jobs.c.status.in_([s.value for s in RUNNING_LIKE]),
                            jobs.c.workspace_mode == "in_place",
                        )
                        .distinct()
                    ).scalars()
                )
                saturated = [u for u, n in running.items() if n >= max_jobs_per_user]
                picked: list[Any] = []
                after: tuple[datetime, str] | None = None
                while len(picked) < slots:
                    query = sa.select(jobs).where(jobs.c.status == Status.QUEUED.value)
                    if saturated:
                        query = query.where(jobs.c.requested_by.not_in(saturated))
                    if after is not None:
                        query = query.where(sa.tuple_(jobs.c.created_at, jobs.c.id) > sa.tuple_(*after))
                    query = query.order_by(jobs.c.created_at, jobs.c.id).limit(page)
                    if self.is_pg:
                        query = query.with_for_update(skip_locked=True)
                    batch = conn.execute(query).mappings().all()
                    for row in batch:
                        user = row["requested_by"]
                        if running.get(user, 0) >= max_jobs_per_user:
                            continue
                        if row["workspace_mode"] == "in_place":
                            if row["repo_id"] in busy_repos:
                                continue
                            busy_repos.add(row["repo_id"])
                        running[user] = running.get(user, 0) + 1
                        picked.append(row)
                        if len(picked) >= slots:
                            break
                    if len(batch) < page:
                        break
                    after = (batch[-1]["created_at"], batch[-1]["id"])
                claimed: list[ClaimedJob] = []
                pending: list[_PendingEvent] = []
                for row in picked:
                    lease = uuid.uuid4().hex
                    values = {
                        "status": Status.RUNNING.value,
                        "started_at": now,
                        "heartbeat_at": now,
                        "runner_id": runner_id,
                        "lease_token": lease,
                        "attempt": row["attempt"] + 1,
                    }
                    conn.execute(
                        jobs.update()
                        .where(jobs.c.id == row["id"], jobs.c.status == Status.QUEUED.value)
                        .values(**values)
                    )
                    claimed.append(ClaimedJob(row["id"], lease, {**row, **values}))
                    pending.append(
                        _PendingEvent(
                            row["id"],
                            EventType.JOB_STARTED,
                            "system",
                            "job started",
                            {"runner_id": runner_id},
                        )
                    )
                ev = self._insert_events(conn, pending, now)
                return claimed, ev

        claimed, ev = with_retries(txn)
        self._notify(ev)
        return claimed

    def heartbeat(self, runner_id: str, leases: Mapping[str, str]) -> dict[str, str]:
        """Refreshes `heartbeat_at` of this instance's jobs in one statement. Returns the jobs
        whose lease still holds, with their current status (to see cancels from other instances)."""
        if not leases:
            return {}

        def txn() -> dict[str, str]:
            now = utcnow()
            with write_txn(self.engine) as conn:
                rows = conn.execute(
                    jobs.update()
                    .where(
                        jobs.c.runner_id == runner_id,
                        jobs.c.lease_token.in_(list(leases.values())),
                        jobs.c.status.in_([s.value for s in RUNNING_LIKE]),
                    )
                    .values(heartbeat_at=now)
                    .returning(jobs.c.id, jobs.c.lease_token, jobs.c.status)
                ).all()
                return {r.id: r.status for r in rows if leases.get(r.id) == r.lease_token}

        return with_retries(txn)

    def update_fields(self, job_id: str, lease_token: str, values: Mapping[str, Any]) -> bool:
        """A fenced write of non-status fields (stages, process ids, partial result)."""

        def txn() -> bool:
            with write_txn(self.engine) as conn:
                result = conn.execute(
                    jobs.update()
                    .where(
                        jobs.c.id == job_id,
                        jobs.c.lease_token == lease_token,
                        jobs.c.status.in_([s.value for s in RUNNING_LIKE]),
                    )
                    .values(**values)
                )
                return result.rowcount == 1

        return with_retries(txn)

    def status_of(self, job_ids: Sequence[str]) -> dict[str, str]:
        if not job_ids:
            return {}

        def txn() -> dict[str, str]:
            with read_txn(self.engine) as conn:
                rows = conn.execute(
                    sa.select(jobs.c.id, jobs.c.status).where(jobs.c.id.in_(list(job_ids)))
                ).all()
                return {r.id: r.status for r in rows}

        return with_retries(txn)

    def active_jobs_of_runner(self, runner_id: str) -> list[dict[str, Any]]:
        def txn() -> list[dict[str, Any]]:
            with read_txn(self.engine) as conn:
                rows = conn.execute(
                    sa.select(jobs).where(
                        jobs.c.runner_id == runner_id, jobs.c.status.in_([s.value for s in RUNNING_LIKE])
                    )
                ).mappings()
                return [dict(r) for r in rows]

        return with_retries(txn)

    def stale_jobs(self, older_than: datetime) -> list[dict[str, Any]]:
        def txn() -> list[dict[str, Any]]:
            with read_txn(self.engine) as conn:
                rows = conn.execute(
                    sa.select(
                        jobs.c.id,
                        jobs.c.status,
                        jobs.c.lease_token,
                        jobs.c.runner_id,
                        jobs.c.script_key,
                        jobs.c.started_at,
                    ).where(
                        jobs.c.status.in_([s.value for s in RUNNING_LIKE]), jobs.c.heartbeat_at < older_than
                    )
                ).mappings()
                return [dict(r) for r in rows]

        return with_retries(txn)

    # -- repos ------------------------------------------------------------------------------

    def sync_repos(self, items: Iterable[Mapping[str, Any]]) -> None:
        """Upserts the configured repos (id, name, source_type, path_or_url, branch, workspace,
        enabled). Repos no longer configured stay, disabled, so old jobs keep their names."""
        items = list(items)

        def txn() -> None:
            now = utcnow()
            with write_txn(self.engine) as conn:
                existing = {r.id: r.name for r in conn.execute(sa.select(repos.c.id, repos.c.name))}
                seen = set()
                for item in items:
                    seen.add(item["id"])
                    values = {**item, "updated_at": now}
                    if item["id"] in existing:
                        conn.execute(repos.update().where(repos.c.id == item["id"]).values(**values))
                    else:
                        # A renamed repo gets a new id; free its old name first.
                        conn.execute(repos.delete().where(repos.c.name == item["name"]))
                        conn.execute(repos.insert().values(**values))
                gone = [rid for rid in existing if rid not in seen]
                if gone:
                    conn.execute(
                        repos.update().where(repos.c.id.in_(gone)).values(enabled=False, updated_at=now)
                    )

        with_retries(txn)

    # -- diagnostics ------------------------------------------------------------------------

    def diagnostics_snapshot(self) -> dict[str, Any]:
        def txn() -> dict[str, Any]:
            now = utcnow()
            with read_txn(self.engine) as conn:
                running = [s.value for s in RUNNING_LIKE]
                per_user: dict[str, int] = dict(
                    conn.execute(
                        sa.select(jobs.c.requested_by, sa.func.count())
                        .where(jobs.c.status.in_(running))
                        .group_by(jobs.c.requested_by)
                    ).all()
                )
                per_instance: dict[str, int] = dict(
                    conn.execute(
                        sa.select(jobs.c.runner_id, sa.func.count())
                        .where(jobs.c.status.in_(running))
                        .group_by(jobs.c.runner_id)
                    ).all()
                )
                oldest = conn.execute(
                    sa.select(sa.func.min(jobs.c.created_at)).where(jobs.c.status == Status.QUEUED.value)
                ).scalar_one()
                inst = conn.execute(sa.select(instances).order_by(instances.c.started_at)).mappings().all()
            oldest_age = None
            if oldest is not None:
                if isinstance(oldest, str):
                    oldest = datetime.fromisoformat(oldest)
                oldest = oldest.replace(tzinfo=now.tzinfo)
                oldest_age = round((now - oldest).total_seconds(), 3)
            return {
                "running_per_user": {k: int(v) for k, v in per_user.items()},
                "running_per_instance": {k: int(v) for k, v in per_instance.items()},
                "oldest_queued_age_seconds": oldest_age,
                "instances": [
                    {
                        "id": r["id"],
                        "host": r["host"],
                        "pid": r["pid"],
                        "version": r["version"],
                        "started_at": iso(r["started_at"]),
                        "heartbeat_at": iso(r["heartbeat_at"]),
                        "stopped_at": iso(r["stopped_at"]),
                    }
                    for r in inst
                ],
            }

        return with_retries(txn)

    # -- crash safety (issue 6) ----------------------------------------------------------------

    def fail_stale(
        self,
        job_id: str,
        heartbeat_before: datetime,
        *,
        event_type: str,
        message: str,
        meta: dict[str, Any],
        values: Mapping[str, Any],
        lock_timeout_ms: int = 500,
    ) -> bool:
        """The watchdog's write: `running`/`cancel_requested` → `failed` if the job has not
        heartbeated since `heartbeat_before`. Unlike `transition`, a row that another session holds
        locked is skipped (False) after `lock_timeout_ms` instead of waited for: an owner frozen in
        the middle of a write (SIGSTOP, a paused VM) holds its row lock until it wakes, and must not
        stall the watchdog for every other job. The next watchdog pass tries that job again."""

        def txn() -> list[dict] | None:
            now = utcnow()
            try:
                with write_txn(self.engine) as conn:
                    if self.is_pg:
                        conn.execute(sa.text(f"SET LOCAL lock_timeout = '{int(lock_timeout_ms)}ms'"))
                    return self._cas(
                        conn,
                        job_id,
                        list(RUNNING_LIKE),
                        Status.FAILED,
                        None,
                        now,
                        "system",
                        event_type,
                        message,
                        meta,
                        values,
                        heartbeat_before=heartbeat_before,
                    )
            except sa.exc.OperationalError as exc:
                if getattr(exc.orig, "sqlstate", None) == "55P03":  # lock_not_available
                    return None
                raise

        ev = with_retries(txn)
        if ev is None:
            return False
        self._notify(ev)
        return True
