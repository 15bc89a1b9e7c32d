"""The exact job counts (migrations 0002 and 0004): kept right by every writer on both databases;
on PostgreSQL appended as deltas that lock nothing another writer waits for, then folded."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from codex_runner.jobs import Status
from codex_runner.store import JobStore, create_store_engine
from codex_runner.store.jobs import Cas, ClaimRequest, OwnerWrite
from codex_runner.store.migrate import MIGRATIONS_DIR, upgrade
from codex_runner.store.schema import all_job_counts, job_count_deltas, job_counts, jobs

from tests.conftest import PG_ADMIN_URL
from tests.integration.test_store_transitions import BIG, new_job

_DONE = {"exit_code": 0, "error_code": None, "error_message": None, "stages": [], "result": None}


def _finish(job_id: str, lease: str, dst: Status = Status.SUCCESS) -> OwnerWrite:
    return OwnerWrite(
        job_id,
        lease,
        (
            Cas((Status.RUNNING,), dst, _DONE, "done"),
            Cas((Status.CANCEL_REQUESTED,), Status.CANCELED, _DONE, "x"),
        ),
    )


def _counted(store: JobStore) -> dict[tuple[str, str, str], int]:
    """The counts as readers see them, without keys whose count is 0."""
    c = all_job_counts.c
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(c.status, c.requested_by, c.repo_id, sa.func.sum(c.n)).group_by(
                c.status, c.requested_by, c.repo_id
            )
        ).all()
    return {(s, u, r): int(n) for s, u, r, n in rows if n}


def _actual(store: JobStore) -> dict[tuple[str, str, str], int]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(jobs.c.status, jobs.c.requested_by, jobs.c.repo_id, sa.func.count()).group_by(
                jobs.c.status, jobs.c.requested_by, jobs.c.repo_id
            )
        ).all()
    return {(s, u, r): int(n) for s, u, r, n in rows}


def _deltas(store: JobStore) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(job_count_deltas)).scalar_one())


def test_every_writer_keeps_the_counts_exact(store: JobStore) -> None:
    """Creates, claims, terminal batches, cancels of queued and running jobs and deletes: the
    counts readers see match the jobs before and after a fold, which empties the deltas."""
    made = [store.create(new_job(user=u, repo=r), BIG)[0]["id"] for u in ("a", "b") for r in ("r1", "r2")]
    made += [store.create(new_job(user="a"), BIG)[0]["id"] for _ in range(4)]
    store.cancel(made[-1], owner=None, actor="a")  # queued → canceled
    claimed = store.claim("i1", slots=4, max_jobs_per_user=10)
    store.cancel(claimed[0].id, owner=None, actor="a")  # running → cancel_requested
    store.finish_many([_finish(j.id, j.lease_token, Status.FAILED) for j in claimed])
    with store.engine.begin() as conn:
        conn.execute(jobs.delete().where(jobs.c.id == claimed[1].id))
    assert _counted(store) == _actual(store)
    assert store.list_jobs(owner="a")[1] == sum(n for (_, u, _), n in _actual(store).items() if u == "a")
    moved = store.fold_counts()
    assert _counted(store) == _actual(store)
    assert _deltas(store) == 0
    if store.is_pg:
        assert moved > 0
        assert store.fold_counts() == 0
    else:  # SQLite updates the counts rows in place (one writer at a time: no deadlock)
        assert moved == 0


def _downgrade(store: JobStore, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with store.engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
        conn.commit()


def test_a_status_change_does_not_wait_for_another_on_the_same_counts(pg_store: JobStore) -> None:
    """Two transactions that change the status of two jobs of one user and repo: the second waits
    for nothing. With the counts rows updated in place it waited for the first's commit on the
    (queued, user, repo) row — and writers that took such rows in other orders deadlocked."""
    first, _ = pg_store.create(new_job(user="same"), BIG)
    second, _ = pg_store.create(new_job(user="same"), BIG)
    move = jobs.update().where(jobs.c.id == sa.bindparam("job")).values(status=Status.CANCELED.value)
    with pg_store.engine.connect() as holder, pg_store.engine.connect() as other:
        holder.begin()
        holder.execute(move, {"job": first["id"]})
        other.begin()
        other.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
        started = time.monotonic()
        other.execute(move, {"job": second["id"]})
        assert time.monotonic() - started < 1
        other.commit()
        holder.commit()
    assert _counted(pg_store) == _actual(pg_store) == {("canceled", "same", "id-r1"): 2}


def _deadlocks(name: str) -> int:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        row = admin.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = %s", (name,)).fetchone()
    assert row is not None
    return int(row[0])


def test_creates_claims_finishes_and_cancels_at_once_never_deadlock(pg_database_url: str) -> None:
    """Two instances claiming and finishing, two create batches and a canceler on the same few
    users and repos for two seconds: no deadlock (each cost a claim 1 s before), exact counts."""
    name = pg_database_url.rsplit("/", 1)[1]
    engine = create_store_engine(pg_database_url)
    upgrade(engine)
    store = JobStore(engine)
    users, repos = ["u0", "u1", "u2"], ["r1", "r2"]
    until = time.monotonic() + 2.0
    made: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def guarded(fn: Any) -> Any:
        def run(*args: Any) -> None:
            try:
                fn(*args)
            except BaseException as exc:  # reported by the test, not lost in a thread
                errors.append(exc)

        return run

    @guarded
    def creator(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < until:
            items = [new_job(user=rnd.choice(users), repo=rnd.choice(repos)) for _ in range(6)]
            ids = [o[0]["id"] for o in store.create_many(items, BIG) if not isinstance(o, Exception)]
            with lock:
                made.extend(ids)

    @guarded
    def instance(runner_id: str, seed: int) -> None:
        rnd = random.Random(seed)
        held: list[Any] = []
        while time.monotonic() < until:
            writes = [_finish(j.id, j.lease_token, rnd.choice([Status.SUCCESS, Status.FAILED])) for j in held]
            _, held = store.finish_many(writes, ClaimRequest(runner_id, 4, 100, None))

    @guarded
    def canceler(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < until:
            with lock:
                ids = rnd.sample(made, min(4, len(made)))
            for job_id in ids:
                try:
                    store.cancel(job_id, owner=None, actor="x")
                except Exception as exc:
                    if "already" not in str(exc):
                        raise

    before = _deadlocks(name)
    threads = [
        threading.Thread(target=creator, args=(1,)),
        threading.Thread(target=creator, args=(2,)),
        threading.Thread(target=instance, args=("a", 3)),
        threading.Thread(target=instance, args=("b", 4)),
        threading.Thread(target=canceler, args=(5,)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    counted, actual = _counted(store), _actual(store)
    engine.dispose()  # the backends' statistics are flushed when they exit, a moment after
    time.sleep(1.0)
    assert _deadlocks(name) - before == 0
    assert counted == actual
    assert sum(n for (s, _, _), n in actual.items() if s in ("success", "failed")) > 0


def test_a_busy_fold_is_skipped_and_readers_still_sum_the_deltas(pg_store: JobStore) -> None:
    made = [pg_store.create(new_job(user="f"), BIG)[0]["id"] for _ in range(3)]
    pg_store.cancel(made[0], owner=None, actor="f")
    with pg_store.engine.connect() as other:
        other.begin()
        assert other.execute(sa.select(sa.func.runner_fold_job_counts())).scalar_one() >= 0
        assert pg_store.fold_counts() == -1  # the other transaction holds the fold
        _, total = pg_store.list_jobs(owner="f", statuses=["queued"])
        assert total == 2
        other.rollback()  # its fold undone: the deltas are back for the next one
    assert _deltas(pg_store) > 0
    assert pg_store.fold_counts() > 0
    assert _deltas(pg_store) == 0
    assert (
        _counted(pg_store)
        == _actual(pg_store)
        == {("queued", "f", "id-r1"): 2, ("canceled", "f", "id-r1"): 1}
    )


def test_the_downgrade_folds_the_deltas_and_updates_in_place_again(pg_store: JobStore) -> None:
    made = [pg_store.create(new_job(user="d"), BIG)[0]["id"] for _ in range(3)]
    pg_store.cancel(made[0], owner=None, actor="d")
    assert _deltas(pg_store) > 0
    _downgrade(pg_store, "0003")
    assert not sa.inspect(pg_store.engine).has_table("runner_job_count_deltas")

    def in_place() -> dict[tuple[str, str, str], int]:
        with pg_store.engine.connect() as conn:
            rows = conn.execute(sa.select(job_counts).where(job_counts.c.n != 0)).all()
        return {(s, u, r): int(n) for s, u, r, n in rows}

    assert in_place() == _actual(pg_store) == {("queued", "d", "id-r1"): 2, ("canceled", "d", "id-r1"): 1}
    with pg_store.engine.begin() as conn:  # the 0002 trigger again
        conn.execute(jobs.update().where(jobs.c.id == made[1]).values(status=Status.CANCELED.value))
    assert in_place() == {("queued", "d", "id-r1"): 1, ("canceled", "d", "id-r1"): 2}
    upgrade(pg_store.engine)
    pg_store.cancel(made[2], owner=None, actor="d")
    assert _deltas(pg_store) == 2
    assert _counted(pg_store) == _actual(pg_store) == {("canceled", "d", "id-r1"): 3}


def test_the_downgrade_waits_for_a_create_batch_in_flight(
    pg_store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create batch holds the fold lock (its fold's) while it inserts; the downgrade took the
    table lock, then waited for the fold lock, and the two deadlocked: the downgrade failed."""
    import codex_runner.store.jobs as jobs_module

    paused, go = threading.Event(), threading.Event()
    real = jobs_module.create_in_txn

    def slow(*args: Any, **kwargs: Any) -> Any:
        paused.set()
        go.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs_module, "create_in_txn", slow)
    outcome: dict[str, Any] = {}

    def create() -> None:
        outcome["create"] = pg_store.create(new_job(user="inflight"), BIG)[0]["status"]

    def downgrade() -> None:
        try:
            _downgrade(pg_store, "0003")
            outcome["downgrade"] = "ok"
        except Exception as exc:
            outcome["downgrade"] = repr(exc)[:300]

    creating = threading.Thread(target=create)
    creating.start()
    assert paused.wait(10)
    downgrading = threading.Thread(target=downgrade)
    downgrading.start()
    time.sleep(1.0)  # the downgrade is waiting for the batch now
    go.set()
    creating.join(30)
    downgrading.join(30)
    assert outcome == {"create": "queued", "downgrade": "ok"}
    with pg_store.engine.connect() as conn:
        rows = conn.execute(sa.select(job_counts).where(job_counts.c.requested_by == "inflight")).all()
    assert [(r.status, r.n) for r in rows] == [("queued", 1)]
    upgrade(pg_store.engine)
