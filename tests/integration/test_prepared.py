"""`Prepared` (store/prepared.py) on SQLite and PostgreSQL: the statements of the hot path run on
the DBAPI cursor must read and write exactly what `Connection.execute` would."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from codex_runner.errors import StoreUnavailable
from codex_runner.store import JobStore, create_store_engine
from codex_runner.store.engine import SQLITE_BUSY_TIMEOUT_SECONDS, with_retries, write_txn
from codex_runner.store.jobs import Limits, NewJob
from codex_runner.store.prepared import Prepared
from codex_runner.store.schema import events, jobs

WHEN = datetime(2026, 11, 30, 1, 2, 3, 456789, tzinfo=UTC)


def _job(store: JobStore) -> str:
    new = NewJob("id-r", "r", "scratch", "s", {"n": 1, "s": "é"}, {}, 60, "alice")
    job, _ = store.create(new, Limits())
    return str(job["id"])


def test_writes_match_connection_execute(store: JobStore) -> None:
    """Bind values go through the columns' own processors: aware datetimes stored as naive UTC,
    JSON encoded (None as JSON null, as SQLAlchemy stores it), a value fixed in the statement."""
    a, b = _job(store), _job(store)
    update = (
        jobs.update()
        .where(jobs.c.id == sa.bindparam("b_id"), jobs.c.status == "queued")
        .values(
            finished_at=sa.bindparam("b_when", type_=jobs.c.finished_at.type),
            stages=sa.bindparam("b_stages", type_=jobs.c.stages.type),
            result=sa.bindparam("b_result", type_=jobs.c.result.type),
        )
    )
    values = {"b_when": WHEN, "b_stages": [{"name": "script", "exit": 0}], "b_result": None}
    prepared = Prepared(update, store.engine.dialect)
    with write_txn(store.engine, op="test") as conn:
        assert prepared.execute(conn, {**values, "b_id": a}) == 1
        assert conn.execute(update, {**values, "b_id": b}).rowcount == 1
        assert prepared.execute(conn, {**values, "b_id": "no-such-job"}) == 0
    with store.engine.connect() as conn:
        raw = conn.execute(
            sa.select(jobs.c.id, sa.cast(jobs.c.finished_at, sa.String), sa.cast(jobs.c.stages, sa.String))
            .where(jobs.c.id.in_([a, b]))
            .order_by(jobs.c.id)
        ).all()
    (_, when_a, stages_a), (_, when_b, stages_b) = raw
    assert (when_a, stages_a) == (when_b, stages_b)  # byte for byte what SQLAlchemy writes
    row_a, row_b = store.get_row(a) or {}, store.get_row(b) or {}
    for key in ("finished_at", "stages", "result"):
        assert row_a[key] == row_b[key], key
    assert row_a["finished_at"] == WHEN and row_a["stages"] == values["b_stages"]


def test_reads_match_connection_execute(store: JobStore) -> None:
    """Result columns go through the columns' processors: aware datetimes, decoded JSON."""
    job_id = _job(store)
    select = sa.select(*jobs.c).where(jobs.c.id == sa.bindparam("b_id"))
    prepared = Prepared(select, store.engine.dialect, result=[c.type for c in jobs.c])
    with store.engine.connect() as conn:
        (row,) = prepared.fetch(conn, {"b_id": job_id})
        expected = conn.execute(select, {"b_id": job_id}).mappings().one()
    assert dict(zip(jobs.c.keys(), row, strict=True)) == dict(expected)
    as_dict = dict(zip(jobs.c.keys(), row, strict=True))
    assert as_dict["args"] == {"n": 1, "s": "é"} and as_dict["created_at"].tzinfo is not None


def test_execute_many_inserts_every_row(store: JobStore) -> None:
    job_id = _job(store)
    keys = ("job_id", "event_type", "actor", "message", "meta", "created_at")
    prepared = Prepared(events.insert(), store.engine.dialect, column_keys=keys)
    rows = [
        {
            "job_id": job_id,
            "event_type": "x",
            "actor": "t",
            "message": str(i),
            "meta": {"i": i},
            "created_at": WHEN,
        }
        for i in range(3)
    ]
    with write_txn(store.engine, op="test") as conn:
        prepared.execute_many(conn, rows)
        prepared.execute_many(conn, [])  # nothing to do, no statement
    with store.engine.connect() as conn:
        got = conn.execute(
            sa.select(events.c.message, events.c.meta, events.c.created_at)
            .where(events.c.job_id == job_id, events.c.event_type == "x")
            .order_by(events.c.id)
        ).all()
    assert [tuple(r) for r in got] == [(str(i), {"i": i}, WHEN) for i in range(3)]


def test_execute_each_counts_each_row(store: JobStore) -> None:
    """One run per row, each with its own count (on PostgreSQL all of them in one pipeline), in
    order, a row that matches nothing included; an error fails the whole call as SQLAlchemy's."""
    a, b = _job(store), _job(store)
    update = (
        jobs.update()
        .where(jobs.c.id == sa.bindparam("b_id"), jobs.c.status == "queued")
        .values(error_message=sa.bindparam("b_msg"))
    )
    prepared = Prepared(update, store.engine.dialect)
    with write_txn(store.engine, op="test") as conn:
        counts = prepared.execute_each(
            conn,
            [{"b_id": a, "b_msg": "a"}, {"b_id": "no-such-job", "b_msg": "x"}, {"b_id": b, "b_msg": "b"}],
        )
        assert counts == [1, 0, 1]
        assert prepared.execute_each(conn, []) == []
    assert (store.get_row(a) or {})["error_message"] == "a"
    assert (store.get_row(b) or {})["error_message"] == "b"
    broken = Prepared(sa.text("UPDATE no_such_table SET x = :x"), store.engine.dialect)
    with store.engine.connect() as conn, pytest.raises((sa.exc.ProgrammingError, sa.exc.OperationalError)):
        broken.execute_each(conn, [{"x": 1}, {"x": 2}])


def test_errors_are_sqlalchemy_errors(store: JobStore) -> None:
    """A DBAPI error comes out as SQLAlchemy's, so `with_retries` and callers treat it as they
    treat one from Connection.execute; expanding parameters are refused up front."""
    prepared = Prepared(sa.text("SELECT * FROM no_such_table"), store.engine.dialect)
    with store.engine.connect() as conn, pytest.raises((sa.exc.ProgrammingError, sa.exc.OperationalError)):
        prepared.execute(conn)
    with pytest.raises(ValueError, match="expanding"):
        Prepared(sa.select(jobs.c.id).where(jobs.c.id.in_(["a", "b"])), store.engine.dialect)


def test_a_transient_error_is_retried_then_reported(store: JobStore) -> None:
    """A lock the statement cannot get in time (another writer holds it) is the transient error
    `with_retries` retries, and in the end reports as `StoreUnavailable`."""
    job_id = _job(store)
    update = jobs.update().where(jobs.c.id == sa.bindparam("b_id")).values(error_message="x")
    prepared = Prepared(update, store.engine.dialect)
    attempts: list[int] = []
    pg = store.engine.dialect.name == "postgresql"

    def run() -> int:
        attempts.append(1)
        with store.engine.connect() as conn, conn.begin():
            # Give up on the lock at once rather than after the usual patience.
            conn.exec_driver_sql("SET LOCAL lock_timeout = '20ms'" if pg else "PRAGMA busy_timeout = 0")
            try:
                return prepared.execute(conn, {"b_id": job_id})
            finally:
                if not pg:
                    conn.exec_driver_sql(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")

    with store.engine.connect() as blocker, blocker.begin():
        if pg:
            blocker.execute(sa.select(jobs.c.id).where(jobs.c.id == job_id).with_for_update())
        else:
            blocker.exec_driver_sql("UPDATE runner_jobs SET error_message = 'held' WHERE id = ?", (job_id,))
        with pytest.raises(StoreUnavailable):
            with_retries(run, attempts=2, first_delay=0.0)
    assert len(attempts) == 2


def test_a_missing_value_is_refused(store: JobStore) -> None:
    """As with Connection.execute, a parameter without a value of its own must be given: never a
    silent NULL."""
    update = (
        jobs.update().where(jobs.c.id == sa.bindparam("b_id")).values(error_message=sa.bindparam("b_msg"))
    )
    prepared = Prepared(update, store.engine.dialect)
    with write_txn(store.engine, op="test") as conn, pytest.raises(sa.exc.ArgumentError, match="b_msg"):
        prepared.execute(conn, {"b_id": "x"})


def test_a_lost_connection_is_invalidated(pg_database_url: str) -> None:
    """A connection the server dropped (PostgreSQL) is invalidated, as SQLAlchemy does with its own
    statements: the error says so and the pool never hands that connection out again."""
    engine = create_store_engine(pg_database_url, pool_size=1)
    try:
        prepared = Prepared(sa.select(sa.literal(1)), engine.dialect, result=[sa.Integer()])
        with engine.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            with engine.connect() as other:
                other.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid or 0)})")
            with pytest.raises(sa.exc.DBAPIError) as caught:
                prepared.fetch(conn)
            assert caught.value.connection_invalidated
            assert conn.invalidated
        for _ in range(3):  # what the pool hands out works
            with engine.connect() as conn:
                assert prepared.fetch(conn) == [[1]]
    finally:
        engine.dispose()
