"""JobStore: every read and write of jobs and their events. Status writes are compare-and-set on
the current status (and, for the owning instance, on its lease), with the event row in the same
transaction."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ClauseElement

from codex_runner.errors import (
    InvalidTransition,
    NotFound,
)
from codex_runner.jobs import (
    ACTIVE,
    EVENT_FOR_STATUS,
    RUNNING_LIKE,
    TERMINAL,
    ErrorCode,
    EventType,
    Status,
    can_transition,
    is_id_text,
    payload_hash,
)
from codex_runner.store.creates import CreateOutcome, create_in_txn
from codex_runner.store.engine import read_txn, with_retries, write_txn
from codex_runner.store.prepared import Prepared
from codex_runner.store.records import event_row, event_to_public, iso, job_to_public, skipped_stages, utcnow
from codex_runner.store.schema import (
    SERVER_CLOCK,
    all_job_counts,
    clock_cutoff,
    clock_now,
    events,
    instances,
    jobs,
    repos,
)

#: The columns of a job's row that the cleanup of an ended run reads (`execution.recovery`).
RECOVERY_COLUMNS = ("id", "repo", "workspace_mode", "error_code", "stages")

# Advisory lock keys (PostgreSQL): one serialises claims, one serialises creates so that the
# queue caps hold across instances.
CLAIM_LOCK_KEY = 0x636F646578_01
CREATE_LOCK_KEY = 0x636F646578_02
# Serialises `sync_repos` of instances that start together (each inserts the new repos).
REPOS_LOCK_KEY = 0x636F646578_03
# 0x636F646578_05, the fold of the job counts, lives in migration 0004's `runner_fold_job_counts()`.

EventListener = Callable[[dict[str, Any]], None]

# Statements of the hot paths (create, get), built once: SQLAlchemy then skips building them and
# their cache keys on every call.
# A create batch also folds the job-count deltas (migration 0004) before its caps read them, so
# that read sums few rows; the same round trip. The fold takes no lock a create waits for.
_CREATE_LOCK = sa.select(sa.func.pg_advisory_xact_lock(CREATE_LOCK_KEY), sa.func.runner_fold_job_counts())
_FOLD_COUNTS = sa.select(sa.func.runner_fold_job_counts())
_INSERT_EVENT = events.insert()
_JOB_BY_ID = sa.select(jobs).where(jobs.c.id == sa.bindparam("id"))
_JOB_BY_ID_OWNED = _JOB_BY_ID.where(jobs.c.requested_by == sa.bindparam("owner"))
# A cancel reads the status it then compares-and-sets: on PostgreSQL the row lock keeps a claim or
# another cancel from moving it in between (SQLite's write transaction already excludes them).
_JOB_BY_ID_LOCKED = _JOB_BY_ID.with_for_update()
_JOB_BY_ID_OWNED_LOCKED = _JOB_BY_ID_OWNED.with_for_update()
_EVENTS_OF_JOB = sa.select(events).where(events.c.job_id == sa.bindparam("job_id")).order_by(events.c.id)


# Claims: the columns that picking reads, and the move of one picked job to `running`.
_PICK_COLUMNS = (jobs.c.id, jobs.c.requested_by, jobs.c.workspace_mode, jobs.c.repo_id, jobs.c.created_at)
# What limits a claim, in one read: the active jobs by user, repo and workspace mode (users at
# their running limit; repos with an active in_place job).
_ACTIVE_BY_USER_REPO = (
    sa.select(jobs.c.requested_by, jobs.c.repo_id, jobs.c.workspace_mode, sa.func.count())
    # Literals, not a list: a list is an expanding parameter, which `Prepared` does not take.
    .where(jobs.c.status.in_([sa.literal(s.value) for s in RUNNING_LIKE]))
    .group_by(jobs.c.requested_by, jobs.c.repo_id, jobs.c.workspace_mode)
)
# The claim lock, after a lock timeout for the rest of the transaction (set_config(..., true) is
# SET LOCAL), in one round trip: the lock is taken per row of the subquery, so after its set_config.
_CLAIM_LOCK = sa.select(sa.func.pg_advisory_xact_lock(CLAIM_LOCK_KEY)).select_from(
    sa.select(sa.func.set_config("lock_timeout", "5s", True).label("lock_timeout")).subquery()
)


def _claim_update_statement(count: int, is_pg: bool) -> sa.UpdateBase:
    """The move of `count` picked jobs to `running` in one statement that returns their rows:
    `UPDATE … FROM` a list of `(id, lease)` values (PostgreSQL; SQLite 3.33+). The first
    heartbeat by the shared clock (`clock_now`): on PostgreSQL the server's, not this host's."""
    picked = (
        sa.values(sa.column("id", sa.String), sa.column("lease", sa.String), name="picked")
        .data([(sa.bindparam(f"b_id{i}"), sa.bindparam(f"b_lease{i}")) for i in range(count)])
        .cte("picked")
    )  # WITH picked(id, lease) AS (VALUES …): SQLite takes no column list after AS
    return (
        jobs.update()
        .where(jobs.c.id == picked.c.id, jobs.c.status == Status.QUEUED.value)
        .values(
            status=Status.RUNNING.value,
            started_at=sa.bindparam("b_now", type_=jobs.c.started_at.type),
            heartbeat_at=SERVER_CLOCK if is_pg else sa.bindparam("b_now", type_=jobs.c.heartbeat_at.type),
            runner_id=sa.bindparam("b_runner"),
            lease_token=picked.c.lease,
            attempt=jobs.c.attempt + 1,
        )
        .returning(*jobs.c)
    )


def _claim_with_events_statement(count: int) -> sa.Select[Any]:
    """PostgreSQL: `_claim_update_statement` and the `job_started` event of each job it moves, in
    one statement (a data-modifying CTE; one round trip less per claim). Returns the jobs' rows."""
    moved = _claim_update_statement(count, True).cte("moved")
    started = events.insert().from_select(
        ["job_id", "event_type", "actor", "message", "meta", "created_at"],
        sa.select(
            moved.c.id,
            sa.literal(EventType.JOB_STARTED.value),
            sa.literal("system"),
            sa.literal("job started"),
            sa.bindparam("b_meta", type_=events.c.meta.type),
            sa.bindparam("b_now", type_=events.c.created_at.type),
        ),
    )
    return sa.select(*moved.c).add_cte(started.cte("started"))


_JOB_KEYS = tuple(jobs.c.keys())
_ACTIVE_COLUMNS = _ACTIVE_BY_USER_REPO.selected_columns
# The columns an event insert sets (the id is the database's).
_EVENT_KEYS = ("job_id", "event_type", "actor", "message", "meta", "created_at")


def _typed(column: sa.Column[Any]) -> sa.BindParameter[Any]:
    return sa.bindparam(f"b_{column.name}", type_=column.type)


# The terminal compare-and-set of an owner write (`finish_many`), the one write every job makes:
# built once, as the claim is. Its values are the ones `JobRun` always sets; the process ids only
# when the job ended before they were recorded (NULL keeps the recorded ones). Any other set of
# values goes through the general `_cas`.
_TERMINAL_VALUES = ("exit_code", "error_code", "error_message", "stages", "result")
_PROCESS_VALUES = ("pid", "pgid", "proc_start_time")
_TERMINAL_CAS = (
    jobs.update()
    .where(
        jobs.c.id == sa.bindparam("b_job"),
        jobs.c.lease_token == sa.bindparam("b_lease"),
        # Two slots, the same status twice when only one is allowed: a fixed statement, where an
        # expanding IN would be re-rendered on every call.
        jobs.c.status.in_([sa.bindparam("b_from1"), sa.bindparam("b_from2")]),
    )
    .values(
        status=sa.bindparam("b_dst"),
        finished_at=sa.bindparam("b_now", type_=jobs.c.finished_at.type),
        **{name: _typed(jobs.c[name]) for name in _TERMINAL_VALUES},
        **{name: sa.func.coalesce(_typed(jobs.c[name]), jobs.c[name]) for name in _PROCESS_VALUES},
    )
)
_TERMINAL_KEYS = frozenset(_TERMINAL_VALUES + _PROCESS_VALUES)


def _terminal_event(write: OwnerWrite, cas: Cas) -> _PendingEvent:
    """The deferred event of a terminal compare-and-set that matched."""
    return _PendingEvent(write.job_id, EVENT_FOR_STATUS[cas.dst], "system", cas.message, cas.meta or {})


def _fits_terminal_cas(cas: Cas) -> bool:
    """Whether `_TERMINAL_CAS` makes exactly the write `_cas` would: every terminal value given
    (the statement sets them all), process ids given as numbers or not at all (COALESCE)."""
    keys = cas.values.keys()
    return (
        cas.dst in TERMINAL
        and 1 <= len(cas.allowed) <= 2
        and _TERMINAL_KEYS.issuperset(keys)
        and all(name in keys for name in _TERMINAL_VALUES)
        and all(cas.values[name] is not None for name in _PROCESS_VALUES if name in keys)
    )


#: How much of a path segment that is no job id a 404 shows.
_SHOWN_ID_CHARS = 40


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


@dataclass(frozen=True)
class Cas:
    """One compare-and-set of an owner write: from one of `allowed` to `dst`, setting `values`."""

    allowed: tuple[Status, ...]
    dst: Status
    values: Mapping[str, Any]
    message: str = ""
    meta: dict[str, Any] | None = None


@dataclass(frozen=True)
class ClaimRequest:
    """What `claim` takes; `finish_many` may make a claim too, in its own transaction."""

    runner_id: str
    slots: int
    max_jobs_per_user: int
    scan: int | None = None


@dataclass(frozen=True)
class OwnerWrite:
    """A write of the instance that holds `lease_token`: the first of `attempts` that matches is
    applied (e.g. running → success, else cancel_requested → canceled), the rest are not tried."""

    job_id: str
    lease_token: str
    attempts: tuple[Cas, ...]


@dataclass
class _PendingEvent:
    job_id: str
    event_type: str
    actor: str
    message: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    # Its own time, when not the one of the insert that carries it.
    at: datetime | None = None


class JobStore:
    """The single owner of job SQL. Thread-safe: each call uses its own connection."""

    def __init__(self, engine: Engine, *, listeners: Sequence[EventListener] = ()) -> None:
        self.engine = engine
        self.is_pg = engine.dialect.name == "postgresql"
        self.listeners: list[EventListener] = list(listeners)
        # The hot path's statements, on the DBAPI cursor (store/prepared.py).
        dialect = engine.dialect
        self._terminal = Prepared(_TERMINAL_CAS, dialect)
        self._event = Prepared(_INSERT_EVENT, dialect, column_keys=_EVENT_KEYS)
        self._active = Prepared(_ACTIVE_BY_USER_REPO, dialect, result=[c.type for c in _ACTIVE_COLUMNS])
        self._claim_lock = Prepared(_CLAIM_LOCK, dialect) if self.is_pg else None
        # Statements that vary by a count, prepared on first use (`_prepared`): claim pages without
        # a user filter or keyset, by page size, and claim updates, by number of jobs; a handful
        # of each (at most the instance's concurrency).
        self._prepared_by_size: dict[tuple[str, int], Prepared] = {}

    # -- events -----------------------------------------------------------------------------

    @staticmethod
    def _event_rows(pending: Iterable[_PendingEvent], now: datetime) -> list[dict]:
        return [event_row(e.job_id, e.event_type, e.actor, e.message, e.meta, e.at or now) for e in pending]

    def _insert_events(self, conn: Connection, pending: Iterable[_PendingEvent], now: datetime) -> list[dict]:
        rows = self._event_rows(pending, now)
        self._event.execute_many(conn, rows)
        return rows

    def _notify(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            for listener in self.listeners:
                # An audit or metrics sink must never break a job write.
                with contextlib.suppress(Exception):
                    listener(row)

    # -- create -----------------------------------------------------------------------------

    def create(self, new: NewJob, limits: Limits) -> tuple[dict[str, Any], bool]:
        """Creates a queued job, or replays the job of an earlier request with the same
        idempotency key and payload. Returns (public job, deduplicated)."""
        outcome = self.create_many([new], limits)[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def create_many(self, items: Sequence[NewJob], limits: Limits) -> list[CreateOutcome]:
        """`create` for several requests in ONE transaction (group commit: one write lock, one
        commit for the lot); each item is answered as if it had come alone after the ones before
        it (store/creates.py). A refused item (`QueueFull`, `IdempotencyConflict`) gets its error
        as its outcome. A database error that is not transient reruns the items one at a time, so
        it fails only the item that causes it."""
        if not items:
            return []
        # The payload's hash only matters with an idempotency key (canonical JSON + SHA-256).
        digests = [
            payload_hash(n.repo_id, n.script_key, n.args, n.defaults) if n.idempotency_key is not None else ""
            for n in items
        ]

        def txn() -> tuple[list[CreateOutcome], list[dict[str, Any]]]:
            with write_txn(self.engine, op="jobs.create_many") as conn:
                if self.is_pg:
                    conn.execute(_CREATE_LOCK)
                return create_in_txn(conn, items, digests, limits)

        try:
            outcomes, ev = with_retries(txn)
        except sa.exc.DBAPIError:
            if len(items) == 1:
                raise
            return [self._create_alone(new, limits) for new in items]
        self._notify(ev)
        return outcomes

    def _create_alone(self, new: NewJob, limits: Limits) -> CreateOutcome:
        try:
            return self.create_many([new], limits)[0]
        except sa.exc.DBAPIError as exc:
            return exc

    def fold_counts(self) -> int:
        """Moves the job-count deltas into the counts rows (PostgreSQL; see migration 0004): how
        many it moved, or -1 when another fold was at it. Creates fold as they go; the launcher's
        heartbeat and retention call this so that the deltas stay few when nothing is created."""
        if not self.is_pg:
            return 0

        def txn() -> int:
            with write_txn(self.engine, op="jobs.fold_counts", idempotent=True) as conn:
                return int(conn.execute(_FOLD_COUNTS).scalar_one())

        return with_retries(txn)

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

    def rows_with_id_prefix(self, prefix: str) -> list[dict[str, Any]]:
        """The raw rows whose id starts with `prefix` (hex digits): the jobs a branch `runner/<id8>`
        may belong to (usually one). A range on the primary key, not a scan."""
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            return []

        def txn() -> list[dict[str, Any]]:
            with read_txn(self.engine) as conn:
                query = sa.select(jobs).where(jobs.c.id >= prefix, jobs.c.id < prefix + "g")
                return [dict(r) for r in conn.execute(query).mappings()]

        return with_retries(txn)

    def _get_row(self, conn: Connection, job_id: str, owner: str | None, *, lock: bool = False) -> Any:
        if not is_id_text(job_id):
            # No job has such an id (nor can PostgreSQL text hold a NUL: a DataError): no trip, and
            # the answer does not carry a path segment of any length or content back whole.
            shown = repr(job_id[:_SHOWN_ID_CHARS]) + ("…" if len(job_id) > _SHOWN_ID_CHARS else "")
            raise NotFound(f"job {shown} not found: a job id is a UUID, as `submit` prints it")
        if owner is None:
            query = _JOB_BY_ID_LOCKED if lock else _JOB_BY_ID
            row = conn.execute(query, {"id": job_id}).mappings().first()
        else:
            query = _JOB_BY_ID_OWNED_LOCKED if lock else _JOB_BY_ID_OWNED
            row = conn.execute(query, {"id": job_id, "owner": owner}).mappings().first()
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
        if repo_id is not None and "\0" in repo_id:  # matches nothing; PostgreSQL would refuse it
            return [], 0
        conds: list[sa.ColumnElement[bool]] = []
        # The total comes from the counts (kept exact by triggers), which have every column a list
        # can filter on: a million-row COUNT(*) becomes a sum over a few hundred rows.
        counted = all_job_counts.c
        count_conds: list[sa.ColumnElement[bool]] = []
        if owner is not None:
            conds.append(jobs.c.requested_by == owner)
            count_conds.append(counted.requested_by == owner)
        if statuses:
            conds.append(jobs.c.status.in_(list(statuses)))
            count_conds.append(counted.status.in_(list(statuses)))
        if repo_id is not None:
            conds.append(jobs.c.repo_id == repo_id)
            count_conds.append(counted.repo_id == repo_id)

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
                    sa.select(sa.func.coalesce(sa.func.sum(counted.n), 0)).where(*count_conds)
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
        stale_after_seconds: float | None = None,
    ) -> bool:
        """Compare-and-set: moves the job from one of `src` to `dst` only if it is still there
        (and still holds `lease_token`, when given; and, with `stale_after_seconds`, still has no
        heartbeat for that long by the shared clock, `clock_cutoff`). Returns False and writes
        nothing otherwise."""
        sources = [src] if isinstance(src, Status) else list(src)
        allowed = [s for s in sources if can_transition(s, dst)]
        if not allowed:
            raise InvalidTransition(f"no transition from {', '.join(sources)} to {dst}")

        def txn() -> list[dict] | None:
            now = utcnow()
            with write_txn(self.engine, op="jobs.transition") as conn:
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
                    heartbeat_before=(
                        None if stale_after_seconds is None else clock_cutoff(self.is_pg, stale_after_seconds)
                    ),
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
        heartbeat_before: Any = None,
        defer_event: list[_PendingEvent] | None = None,
    ) -> list[dict] | None:
        """The compare-and-set and its event row; None when it matched nothing. With `defer_event`
        the event is appended there for the caller to insert (one insert for a whole batch)."""
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
        event = _PendingEvent(job_id, event_type or EVENT_FOR_STATUS[dst], actor, message, meta or {})
        if defer_event is not None:
            defer_event.append(event)
            return []
        return self._insert_events(conn, [event], now)

    def finish_many(
        self, writes: Sequence[OwnerWrite], claim: ClaimRequest | None = None
    ) -> tuple[list[int | None], list[ClaimedJob]]:
        """Group commit of owner writes (the terminal status of every job that ended meanwhile):
        one transaction, each write still its own compare-and-set on status and lease, with its
        event row. For each write, the index of the first of its `attempts` that matched, or None
        when none did (a lost lease or a status that moved on) — which affects no other write.

        With `claim`, the same transaction then claims jobs for the slots the finished ones free
        (as `claim` does, after the writes, so their users' running counts are already down):
        one transaction per finished batch instead of two."""
        for write in writes:
            for cas in write.attempts:
                if not all(can_transition(s, cas.dst) for s in cas.allowed):
                    raise InvalidTransition(f"no transition from {', '.join(cas.allowed)} to {cas.dst}")
        if not writes and claim is None:
            return [], []

        def txn() -> tuple[list[int | None], list[ClaimedJob], list[dict]]:
            now = utcnow()
            pending: list[_PendingEvent] = []
            with write_txn(self.engine, op="jobs.finish_many") as conn:
                claiming = claim is not None and claim.slots > 0
                if claiming and self._claim_lock is not None:
                    # The claim lock before the writes: their row locks (jobs, and the counts rows
                    # their triggers update) held while waiting for it would deadlock with the
                    # claim of another instance, which holds it and updates those counts rows.
                    self._claim_lock.execute(conn)
                held = self._first_cas_all(conn, writes, now, pending)
                claimed: list[ClaimedJob] = []
                if claim is not None and claiming:
                    # Its events join the terminal ones: one insert (a round trip) for both.
                    claimed, _ = self._claim_in(conn, claim, defer_events=pending, locked=True)
                return held, claimed, self._insert_events(conn, pending, now)

        held, claimed, ev = with_retries(txn)
        self._notify(ev)
        return held, claimed

    def _first_cas_all(
        self, conn: Connection, writes: Sequence[OwnerWrite], now: datetime, pending: list[_PendingEvent]
    ) -> list[int | None]:
        """`_first_cas` of each write, in order. On PostgreSQL the first attempts that take
        `_TERMINAL_CAS` (the usual batch: every job's terminal write) go in one round trip; a write
        whose first attempt did not match goes on with its next ones as `_first_cas` would."""
        # Rows locked in job id order, as the heartbeat locks them: the same instance's heartbeat
        # and batch touch the same jobs at once, and in two orders they deadlock (PostgreSQL).
        order = sorted(range(len(writes)), key=lambda i: writes[i].job_id)
        first: dict[int, bool] = {}
        if self.is_pg:
            usual = [i for i in order if _fits_terminal_cas(writes[i].attempts[0])]
            if len(usual) > 1:
                params = [self._terminal_params(writes[i], writes[i].attempts[0], now) for i in usual]
                counts = self._terminal.execute_each(conn, params)
                first = {i: count == 1 for i, count in zip(usual, counts, strict=True)}
        held: list[int | None] = [None] * len(writes)
        for i in order:
            write = writes[i]
            if first.get(i):
                pending.append(_terminal_event(write, write.attempts[0]))
                held[i] = 0
            else:
                held[i] = self._first_cas(conn, write, now, pending, start=1 if i in first else 0)
        missed = [i for i, index in enumerate(held) if index is None]
        if missed:  # rare (a lost lease): a read more only then
            for i, index in self._already_written(conn, [writes[i] for i in missed]).items():
                held[missed[i]] = index
        return held

    @staticmethod
    def _already_written(conn: Connection, writes: Sequence[OwnerWrite]) -> dict[int, int]:
        """Of owner writes that matched nothing, those already applied: the job is in the terminal
        status of one of their attempts and still holds their lease, which only the owner's own
        earlier write leaves (recovery clears the lease). That is a write retried after its COMMIT
        was lost (`CommitOutcomeUnknown`): it counts as held, by that attempt's index, and its
        event is not written twice. By position in `writes`."""
        rows = conn.execute(
            sa.select(jobs.c.id, jobs.c.status, jobs.c.lease_token).where(
                jobs.c.id.in_([w.job_id for w in writes])
            )
        ).all()
        current = {r.id: (r.status, r.lease_token) for r in rows}
        found: dict[int, int] = {}
        for position, write in enumerate(writes):
            status, lease = current.get(write.job_id, (None, None))
            if lease != write.lease_token:
                continue
            for index, cas in enumerate(write.attempts):
                if cas.dst in TERMINAL and cas.dst.value == status:
                    found[position] = index
                    break
        return found

    def _first_cas(
        self, conn: Connection, write: OwnerWrite, now: datetime, pending: list[_PendingEvent], start: int = 0
    ) -> int | None:
        for index, cas in enumerate(write.attempts[start:], start):
            if _fits_terminal_cas(cas):
                if self._terminal_cas(conn, write, cas, now, pending):
                    return index
                continue
            matched = self._cas(
                conn,
                write.job_id,
                cas.allowed,
                cas.dst,
                write.lease_token,
                now,
                "system",
                None,
                cas.message,
                cas.meta,
                cas.values,
                defer_event=pending,
            )
            if matched is not None:
                return index
        return None

    def _terminal_cas(
        self, conn: Connection, write: OwnerWrite, cas: Cas, now: datetime, pending: list[_PendingEvent]
    ) -> bool:
        """`cas` (one that `_fits_terminal_cas`) through `_TERMINAL_CAS`: the same compare-and-set
        and deferred event as `_cas`, without building a statement. False when it did not match."""
        if self._terminal.execute(conn, self._terminal_params(write, cas, now)) != 1:
            return False
        pending.append(_terminal_event(write, cas))
        return True

    @staticmethod
    def _terminal_params(write: OwnerWrite, cas: Cas, now: datetime) -> dict[str, Any]:
        params: dict[str, Any] = {
            "b_job": write.job_id,
            "b_lease": write.lease_token,
            "b_from1": cas.allowed[0].value,
            "b_from2": cas.allowed[-1].value,
            "b_dst": cas.dst.value,
            "b_now": now,
        }
        for name in (*_TERMINAL_VALUES, *_PROCESS_VALUES):
            params[f"b_{name}"] = cas.values.get(name)  # absent process ids: NULL, so COALESCE keeps them
        return params

    def cancel(self, job_id: str, *, owner: str | None, actor: str) -> tuple[dict[str, Any], int]:
        """SPEC §4 cancel: queued → 200 canceled; running → 202 cancel_requested; already
        cancel_requested → 202; other terminal → InvalidTransition (409)."""

        def txn() -> tuple[dict[str, Any], int, list[dict]]:
            now = utcnow()
            with write_txn(self.engine, op="jobs.cancel") as conn:
                row = self._get_row(conn, job_id, owner, lock=True)
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
                        {
                            "error_code": "canceled",
                            "error_message": "canceled while queued",
                            "stages": skipped_stages(),
                        },
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
                if ev is None:  # pragma: no cover - impossible under the write lock / row lock
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
        request = ClaimRequest(runner_id, slots, max_jobs_per_user, scan)

        def txn() -> tuple[list[ClaimedJob], list[dict]]:
            with write_txn(self.engine, op="jobs.claim") as conn:
                return self._claim_in(conn, request)

        claimed, ev = with_retries(txn)
        self._notify(ev)
        return claimed

    def _claim_in(
        self,
        conn: Connection,
        request: ClaimRequest,
        *,
        defer_events: list[_PendingEvent] | None = None,
        locked: bool = False,
    ) -> tuple[list[ClaimedJob], list[dict]]:
        """The claim, inside the caller's write transaction (see `claim`). With `defer_events`,
        its events are added there for the caller to insert, and none are returned. `locked`: the
        caller has taken the claim lock already."""
        runner_id, slots, max_jobs_per_user = request.runner_id, request.slots, request.max_jobs_per_user
        # A few candidates per free slot: users at their limit are filtered in SQL, so a page
        # this size nearly always fills the slots; the keyset loop fetches more when it does not
        # (a user who reaches the limit within this claim, an in_place repo already taken).
        # Small, because every row read is decoded: a busy runner claims a slot or two at a time.
        page = request.scan or min(200, max(4, slots * 2))
        if self._claim_lock is not None and not locked:
            # A frozen instance holding a row lock must not stall claims cluster-wide.
            self._claim_lock.execute(conn)
        # After the lock: started_at must not predate the wait for it.
        now = utcnow()
        running: dict[str, int] = {}
        busy_repos: set[str] = set()
        for user, repo_id, mode, n in self._active.fetch(conn):
            running[user] = running.get(user, 0) + n
            if mode == "in_place":
                busy_repos.add(repo_id)
        saturated = [u for u, n in running.items() if n >= max_jobs_per_user]
        picked: list[str] = []
        seen: set[str] = set()
        after: tuple[datetime, str] | None = None
        while len(picked) < slots:
            batch = self._pick_page(conn, page, saturated, after)
            fresh = False
            for job_id, user, mode, repo_id, _ in batch:
                # A page that repeats rows (a keyset that does not advance) must neither pick a
                # job twice nor loop forever under the claim lock.
                if job_id in seen:
                    continue
                seen.add(job_id)
                fresh = True
                if running.get(user, 0) >= max_jobs_per_user:
                    continue
                if mode == "in_place":
                    if repo_id in busy_repos:
                        continue
                    busy_repos.add(repo_id)
                running[user] = running.get(user, 0) + 1
                picked.append(job_id)
                if len(picked) >= slots:
                    break
            if len(batch) < page or not fresh:
                break
            after = (batch[-1][4], batch[-1][0])
        if not picked:
            return [], []
        # The rows were picked under the claim lock (and locked on PostgreSQL): every update hits.
        # One statement for all, each job with a lease of its own, that returns their rows.
        leases = {job_id: uuid.uuid4().hex for job_id in picked}
        values: dict[str, Any] = {"b_now": now, "b_runner": runner_id}
        for i, (job_id, lease) in enumerate(leases.items()):
            values[f"b_id{i}"], values[f"b_lease{i}"] = job_id, lease
        # The events go with the caller's own insert (deferred), else with the update itself on
        # PostgreSQL, else (SQLite has no data-modifying CTE) in a statement of their own.
        kind = "claim_events" if defer_events is None and self.is_pg else "claim"
        if kind == "claim_events":
            values["b_meta"] = {"runner_id": runner_id}
        rows = {
            row[0]: dict(zip(_JOB_KEYS, row, strict=True))
            for row in self._prepared(kind, len(leases)).fetch(conn, values)
        }
        claimed = [ClaimedJob(job_id, lease, rows[job_id]) for job_id, lease in leases.items()]
        pending = [
            _PendingEvent(
                job.id, EventType.JOB_STARTED, "system", "job started", {"runner_id": runner_id}, at=now
            )
            for job in claimed
        ]
        if defer_events is not None:
            defer_events.extend(pending)
            return claimed, []
        if kind == "claim_events":
            return claimed, self._event_rows(pending, now)  # written by the update
        return claimed, self._insert_events(conn, pending, now)

    def _prepared(self, kind: str, size: int) -> Prepared:
        """The claim's `kind` of statement ("pick": a first page of `size` rows; "claim": the
        update of `size` jobs; "claim_events": that update with their events), prepared once per
        size."""
        prepared = self._prepared_by_size.get((kind, size))
        if prepared is None:
            statement: ClauseElement
            result: Sequence[sa.ColumnElement[Any]]
            if kind == "pick":
                statement, result = self._pick_query(size, [], None), _PICK_COLUMNS
            elif kind == "claim_events":
                statement, result = _claim_with_events_statement(size), tuple(jobs.c)
            else:
                statement, result = _claim_update_statement(size, self.is_pg), tuple(jobs.c)
            prepared = Prepared(statement, self.engine.dialect, result=[c.type for c in result])
            self._prepared_by_size[(kind, size)] = prepared
        return prepared

    def _pick_page(
        self, conn: Connection, page: int, saturated: list[str], after: tuple[datetime, str] | None
    ) -> Sequence[Sequence[Any]]:
        """The next page of claim candidates, as `_PICK_COLUMNS`: only what picking needs (the
        full rows, JSON columns and all, are read for the picked jobs alone, by their update).
        The usual first page (no user at the limit) is prepared once per page size."""
        if saturated or after is not None:
            return conn.execute(self._pick_query(page, saturated, after)).all()
        return self._prepared("pick", page).fetch(conn)

    def _pick_query(
        self, page: int, saturated: list[str], after: tuple[datetime, str] | None
    ) -> sa.Select[Any]:
        query = sa.select(*_PICK_COLUMNS).where(jobs.c.status == Status.QUEUED.value)
        if saturated:
            query = query.where(jobs.c.requested_by.not_in(saturated))
        if after is not None:
            # Bound with the columns' own types: a plain DateTime bind sends the aware datetime as
            # a timestamptz, compared with the naive UTC column through the session's TimeZone.
            query = query.where(
                sa.tuple_(jobs.c.created_at, jobs.c.id)
                > sa.tuple_(
                    sa.bindparam("after_at", after[0], type_=jobs.c.created_at.type),
                    sa.bindparam("after_id", after[1], type_=jobs.c.id.type),
                )
            )
        query = query.order_by(jobs.c.created_at, jobs.c.id).limit(page)
        if self.is_pg:
            query = query.with_for_update(skip_locked=True)
        return query

    def heartbeat(self, runner_id: str, leases: Mapping[str, str]) -> dict[str, str]:
        """Refreshes `heartbeat_at` of this instance's jobs in one statement. Returns the jobs
        whose lease still holds, with their current status (to see cancels from other instances)."""
        if not leases:
            return {}

        def txn() -> dict[str, str]:
            conds = (
                jobs.c.runner_id == runner_id,
                jobs.c.lease_token.in_(list(leases.values())),
                jobs.c.status.in_([s.value for s in RUNNING_LIKE]),
            )
            with write_txn(self.engine, op="jobs.heartbeat", idempotent=True) as conn:
                if self.is_pg:
                    # One UPDATE locks its rows in scan order; a batch of terminal writes of the
                    # same jobs locks them by id (`_first_cas_all`): locked by id first here too.
                    conn.execute(sa.select(jobs.c.id).where(*conds).order_by(jobs.c.id).with_for_update())
                rows = conn.execute(
                    jobs.update()
                    .where(*conds)
                    .values(heartbeat_at=clock_now(self.is_pg))
                    .returning(jobs.c.id, jobs.c.lease_token, jobs.c.status)
                ).all()
                return {r.id: r.status for r in rows if leases.get(r.id) == r.lease_token}

        return with_retries(txn)

    def update_fields(self, job_id: str, lease_token: str, values: Mapping[str, Any]) -> bool:
        """A fenced write of non-status fields (stages, process ids, partial result)."""

        def txn() -> bool:
            with write_txn(self.engine, op="jobs.update_fields", idempotent=True) as conn:
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

    def stale_failed_ids_of_runner(self, runner_id: str, *, after: str | None, limit: int) -> list[str]:
        """One page, in id order after `after`, of the ids of `runner_id`'s jobs that a watchdog
        failed (`heartbeat_stale`): an earlier life's, whose run folder this host may still have to
        clean up at start-up. Ids only, a page at a time: with a fixed `RUNNER_ID` they are all of
        its history (till retention), and few have a folder here that is not cleaned up yet."""

        def txn() -> list[str]:
            query = sa.select(jobs.c.id).where(
                jobs.c.runner_id == runner_id,
                jobs.c.status == Status.FAILED.value,
                jobs.c.error_code == ErrorCode.HEARTBEAT_STALE.value,
            )
            if after is not None:
                query = query.where(jobs.c.id > after)
            with read_txn(self.engine) as conn:
                return list(conn.execute(query.order_by(jobs.c.id).limit(limit)).scalars())

        return with_retries(txn)

    def recovery_rows(self, job_ids: Collection[str]) -> list[dict[str, Any]]:
        """What a start-up cleanup of ended jobs reads of their rows (`recovery.clean_up_failed_
        elsewhere`), for `job_ids` (a page of `stale_failed_ids_of_runner`), in id order."""
        if not job_ids:
            return []

        def txn() -> list[dict[str, Any]]:
            with read_txn(self.engine) as conn:
                rows = conn.execute(
                    sa.select(*(jobs.c[name] for name in RECOVERY_COLUMNS))
                    .where(jobs.c.id.in_(list(job_ids)))
                    .order_by(jobs.c.id)
                ).mappings()
                return [dict(r) for r in rows]

        return with_retries(txn)

    def stale_jobs(self, stale_after_seconds: float) -> list[dict[str, Any]]:
        """Running jobs of any instance without a heartbeat for `stale_after_seconds`, by the
        shared clock (`clock_now`)."""

        def txn() -> list[dict[str, Any]]:
            older_than = clock_cutoff(self.is_pg, stale_after_seconds)
            with read_txn(self.engine) as conn:
                rows = conn.execute(
                    sa.select(
                        jobs.c.id,
                        jobs.c.status,
                        jobs.c.lease_token,
                        jobs.c.runner_id,
                        jobs.c.script_key,
                        jobs.c.started_at,
                        jobs.c.stages,
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
            with write_txn(self.engine, op="jobs.sync_repos") as conn:
                if self.is_pg:
                    # Else two instances starting with a new repo both insert it: a unique
                    # violation that fails the later one's start-up.
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(REPOS_LOCK_KEY)))
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
        stale_after_seconds: float,
        *,
        event_type: str,
        message: str,
        meta: dict[str, Any],
        values: Mapping[str, Any],
        lock_timeout_ms: int = 500,
    ) -> bool:
        """The watchdog's write: `running`/`cancel_requested` → `failed` if the job has still not
        heartbeated for `stale_after_seconds` (shared clock, as `stale_jobs`). Unlike `transition`, a row that another session holds
        locked is skipped (False) after `lock_timeout_ms` instead of waited for: an owner frozen in
        the middle of a write (SIGSTOP, a paused VM) holds its row lock until it wakes, and must not
        stall the watchdog for every other job. The next watchdog pass tries that job again."""

        def txn() -> list[dict] | None:
            now = utcnow()
            try:
                with write_txn(self.engine, op="jobs.fail_stale") as conn:
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
                        heartbeat_before=clock_cutoff(self.is_pg, stale_after_seconds),
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
