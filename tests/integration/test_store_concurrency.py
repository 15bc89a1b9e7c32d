"""The store under instances that start, claim and commit at the same time, on a real SQLite file or
PostgreSQL database: session time zones, lost COMMIT answers, registration and repo sync races,
migrations of a fresh SQLite file, and the lock order of a finish that claims."""

from __future__ import annotations

import multiprocessing
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from codex_runner.errors import CommitOutcomeUnknown, InstanceConflict, StoreUnavailable
from codex_runner.jobs import Status
from codex_runner.store import JobStore, create_store_engine
from codex_runner.store.instances import InstanceRegistry
from codex_runner.store.jobs import CLAIM_LOCK_KEY, Cas, ClaimRequest, Limits, OwnerWrite
from codex_runner.store.migrate import is_current, upgrade
from codex_runner.store.schema import events, jobs

from tests.conftest import PG_ADMIN_URL
from tests.integration.test_store_transitions import new_job

BIG = Limits(max_queue_size=10_000, max_queued_per_user=10_000)


def _success(job_id: str, lease: str) -> OwnerWrite:
    values: dict[str, Any] = {
        "exit_code": 0,
        "error_code": None,
        "error_message": None,
        "stages": [],
        "result": None,
    }
    return OwnerWrite(job_id, lease, (Cas((Status.RUNNING,), Status.SUCCESS, values, "success"),))


def _count(store: JobStore, *conds: Any) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(jobs).where(*conds)).scalar_one())


def _events_of(store: JobStore, job_id: str, event_type: str) -> int:
    with store.engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(events)
                .where(events.c.job_id == job_id, events.c.event_type == event_type)
            ).scalar_one()
        )


def _migrated(url: str) -> Iterator[JobStore]:
    engine = create_store_engine(url)
    upgrade(engine)
    yield JobStore(engine)
    engine.dispose()


# -- session time zone and the claim's keyset pages --------------------------------------------


@pytest.fixture(params=["America/New_York", "Europe/Berlin"])
def zoned_store(request: pytest.FixtureRequest, pg_database_url: str) -> Iterator[JobStore]:
    """A store on a PostgreSQL database whose default TimeZone is not UTC (behind and ahead)."""
    name = pg_database_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE \"{name}\" SET timezone = '{request.param}'")
    yield from _migrated(pg_database_url)


def _claim_in_thread(store: JobStore, **kwargs: Any) -> list[str]:
    """A claim that must end: it holds the cluster-wide claim lock while it runs."""
    out: list[list[str]] = []
    thread = threading.Thread(
        target=lambda: out.append([c.id for c in store.claim("r", **kwargs)]), daemon=True
    )
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "claim() still running after 10 s"
    return out[0]


def test_sessions_run_in_utc(zoned_store: JobStore) -> None:
    with zoned_store.engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW timezone").scalar() == "UTC"


def test_claim_pages_past_a_user_at_the_limit_in_any_time_zone(zoned_store: JobStore) -> None:
    """Keyset pages past the jobs of a user who reaches the limit within the claim. Ahead of UTC
    the keyset skipped the eligible job behind them."""
    store = zoned_store
    ahead = [store.create(new_job("a"), BIG)[0]["id"] for _ in range(10)]
    behind = store.create(new_job("b"), BIG)[0]["id"]
    assert _claim_in_thread(store, slots=2, max_jobs_per_user=1) == [ahead[0], behind]


def test_claim_pages_past_a_busy_in_place_repo_in_any_time_zone(zoned_store: JobStore) -> None:
    """Keyset pages past a full page of jobs on an in_place repo that is busy. Behind UTC the page
    never advanced: a claim that never ended, holding the claim lock of every instance."""
    store = zoned_store
    store.create(new_job("u0", repo="solo", mode="in_place"), BIG)
    assert len(_claim_in_thread(store, slots=1, max_jobs_per_user=5)) == 1
    for i in range(4):  # a full first page (4 rows for one slot)
        store.create(new_job(f"u{i + 1}", repo="solo", mode="in_place"), BIG)
    other = store.create(new_job("z", repo="other"), BIG)[0]["id"]
    assert _claim_in_thread(store, slots=1, max_jobs_per_user=5) == [other]


def test_the_keyset_bind_does_not_depend_on_the_session_time_zone(pg_store: JobStore) -> None:
    """The keyset compares with the column's own type (naive UTC), also in a session that is not
    in UTC (one opened by other means than `create_store_engine`)."""
    ids = [pg_store.create(new_job(f"u{i}"), BIG)[0]["id"] for i in range(3)]
    with pg_store.engine.connect() as conn:
        first = conn.execute(sa.select(jobs.c.created_at).where(jobs.c.id == ids[0])).scalar_one()
        for zone in ("America/New_York", "Asia/Tokyo"):
            conn.exec_driver_sql(f"SET TIME ZONE '{zone}'")
            page = conn.execute(pg_store._pick_query(10, [], (first, ids[0]))).all()
            assert [row[0] for row in page] == ids[1:], zone
        conn.rollback()


def test_session_options_of_the_url_are_kept(pg_database_url: str) -> None:
    engine = create_store_engine(pg_database_url + "?options=-c%20statement_timeout%3D12345")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "12345ms"
            assert conn.exec_driver_sql("SHOW timezone").scalar() == "UTC"
            assert conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar() == "30s"
    finally:
        engine.dispose()


def test_a_page_that_does_not_advance_ends_the_claim(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: should a keyset page ever repeat rows, the claim neither picks a job twice
    nor loops."""
    ids = [store.create(new_job("a"), BIG)[0]["id"] for _ in range(6)]
    real = store._pick_page

    def same_page(conn: Any, page: int, saturated: list[str], after: Any) -> Sequence[Sequence[Any]]:
        return real(conn, page, saturated, None)

    monkeypatch.setattr(store, "_pick_page", same_page)
    assert _claim_in_thread(store, slots=3, max_jobs_per_user=1, scan=2) == [ids[0]]


# -- a COMMIT whose answer is lost -------------------------------------------------------------


def _lose_commit_answers(monkeypatch: pytest.MonkeyPatch, store: JobStore, times: int = 1) -> None:
    """The server commits, then the connection drops before the client hears back."""
    dialect = store.engine.dialect
    real = dialect.do_commit
    left = [times]

    def do_commit(dbapi_conn: Any) -> None:
        real(dbapi_conn)
        if left[0] > 0:
            left[0] -= 1
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(dialect, "do_commit", do_commit)


def test_a_create_whose_commit_is_lost_is_not_run_again(
    pg_store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _lose_commit_answers(monkeypatch, pg_store)
    with pytest.raises(CommitOutcomeUnknown) as caught:
        pg_store.create(new_job(), BIG)
    assert isinstance(caught.value, StoreUnavailable)  # 503 `unavailable`, as before
    assert _count(pg_store) == 1


def test_a_claim_whose_commit_is_lost_is_not_run_again(
    pg_store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run again, the claim would take a second job and leave the first running under no lease
    this instance knows; now only the first is (the launcher adopts it: docs/crash-safety.md)."""
    pg_store.create(new_job("a"), BIG)
    pg_store.create(new_job("b"), BIG)
    _lose_commit_answers(monkeypatch, pg_store)
    with pytest.raises(CommitOutcomeUnknown):
        pg_store.claim("r", slots=1, max_jobs_per_user=1)
    assert _count(pg_store, jobs.c.status == Status.RUNNING.value) == 1


def test_an_owner_write_retried_after_a_lost_commit_holds(
    pg_store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launcher retries owner writes on StoreUnavailable: the retry finds its own terminal
    status, with its lease, and counts as held (no `lease lost`, no second event)."""
    job = pg_store.create(new_job(), BIG)[0]["id"]
    lease = pg_store.claim("r", slots=1, max_jobs_per_user=1)[0].lease_token
    _lose_commit_answers(monkeypatch, pg_store)
    with pytest.raises(CommitOutcomeUnknown):
        pg_store.finish_many([_success(job, lease)])
    assert pg_store.finish_many([_success(job, lease)]) == ([0], [])
    assert _events_of(pg_store, job, "job_succeeded") == 1


def test_idempotent_writes_are_retried_after_a_lost_commit(
    pg_store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A heartbeat or a fenced field update applied twice is the same as once: a lost COMMIT
    answer is retried rather than taken for a database outage."""
    job = pg_store.create(new_job(), BIG)[0]["id"]
    lease = pg_store.claim("r", slots=1, max_jobs_per_user=1)[0].lease_token
    _lose_commit_answers(monkeypatch, pg_store, times=2)
    assert pg_store.heartbeat("r", {job: lease}) == {job: "running"}
    assert pg_store.update_fields(job, lease, {"pid": 4242})
    row = pg_store.get_row(job)
    assert row is not None and row["pid"] == 4242


def test_an_applied_owner_write_counts_as_held_only_with_its_lease(store: JobStore) -> None:
    ids = [store.create(new_job(f"u{i}"), BIG)[0]["id"] for i in range(2)]
    leases = {c.id: c.lease_token for c in store.claim("r", slots=2, max_jobs_per_user=1)}
    writes = [_success(i, leases[i]) for i in ids]
    assert store.finish_many(writes) == ([0, 0], [])
    # Applied already: held again, by the same attempt, without a second event.
    assert store.finish_many(writes) == ([0, 0], [])
    assert [_events_of(store, i, "job_succeeded") for i in ids] == [1, 1]
    # Another lease (a recovered job's old owner) never matches.
    assert store.finish_many([_success(ids[0], "not-the-lease")]) == ([None], [])
    with store.engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == ids[1]).values(lease_token=None))
    assert store.finish_many([writes[1]]) == ([None], [])


# -- instances that start together -------------------------------------------------------------


def test_instances_of_one_id_starting_together_register_one(
    pg_store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same RUNNER_ID on two hosts: without a lock both read "no live holder" before either wrote."""
    local = threading.local()
    # Each thread is an instance on a host of its own.
    monkeypatch.setattr(socket, "gethostname", lambda: getattr(local, "host", "main"))
    real = InstanceRegistry._holder

    def slow_holder(self: InstanceRegistry, conn: sa.Connection, stale: int) -> str | None:
        problem = real(self, conn, stale)
        time.sleep(0.3)  # the other instance looks meanwhile
        return problem

    monkeypatch.setattr(InstanceRegistry, "_holder", slow_holder)
    results: dict[str, str] = {}

    def start(host: str) -> None:
        local.host = host
        try:
            InstanceRegistry(pg_store.engine, "w1").register(120)
            results[host] = "registered"
        except InstanceConflict:
            results[host] = "refused"

    threads = [threading.Thread(target=start, args=(h,)) for h in ("hostA", "hostB")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(results.values()) == ["refused", "registered"], results


def test_instances_starting_together_sync_a_new_repo(pg_store: JobStore) -> None:
    failures: list[str] = []
    for _ in range(10):
        rid = str(uuid.uuid4())
        item = {
            "id": rid,
            "name": f"repo-{rid[:8]}",
            "source_type": "local",
            "path_or_url": "/srv/x",
            "branch": "main",
            "workspace": "worktree",
            "enabled": True,
        }
        barrier = threading.Barrier(2)

        def start(item: dict[str, Any] = item, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                pg_store.sync_repos([item])
            except sa.exc.DBAPIError as exc:
                failures.append(str(exc.orig).splitlines()[0])

        threads = [threading.Thread(target=start) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []


def _migrate(url: str, start_at: float, results: Any) -> None:
    engine = create_store_engine(url)
    while time.time() < start_at:
        time.sleep(0.001)
    try:
        upgrade(engine)
        results.put("ok")
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")


def test_instances_starting_together_migrate_a_fresh_sqlite_file(tmp_path: Any) -> None:
    """WAL switch and alembic's read-then-write on a new file: "database is locked" at once for all
    but one, before the busy timeout came first and the upgrade took the write lock up front."""
    ctx = multiprocessing.get_context("spawn")
    outcomes: list[str] = []
    for round_ in range(2):
        url = f"sqlite:///{tmp_path / f'r{round_}.db'}"
        results = ctx.Queue()
        start_at = time.time() + 1.5  # past the imports of the spawned interpreters
        procs = [ctx.Process(target=_migrate, args=(url, start_at, results)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes += [results.get(timeout=5) for _ in procs]
        engine = create_store_engine(url)
        try:
            assert is_current(engine)
        finally:
            engine.dispose()
    assert outcomes == ["ok"] * 6, outcomes


# -- lock order of a finish that claims (PostgreSQL) -------------------------------------------


def test_a_finish_that_claims_waits_for_the_claim_lock_before_writing(pg_store: JobStore) -> None:
    """Another instance's claim holds the claim lock and will update the counts rows that this
    finish's terminal write updates (triggers): the finish must wait for the lock before it locks
    any row, else the two deadlock (PostgreSQL breaks it after deadlock_timeout, 1 s, per claim)."""
    store = pg_store
    job = store.create(new_job("u"), BIG)[0]["id"]
    lease = store.claim("A", slots=1, max_jobs_per_user=5)[0].lease_token
    queued = store.create(new_job("u"), BIG)[0]["id"]
    out: dict[str, Any] = {}
    with store.engine.connect() as other:
        other_txn = other.begin()
        other.execute(sa.select(sa.func.pg_advisory_xact_lock(CLAIM_LOCK_KEY)))  # B is claiming

        def finish() -> None:
            out["result"] = store.finish_many([_success(job, lease)], ClaimRequest("A", 1, 5))

        thread = threading.Thread(target=finish, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the finish waits on the claim lock
            waiting = other.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                )
            ).scalar_one()
            if waiting:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the finish never waited for the claim lock")
        # The finish has not locked its job's row: B's claim could write any row it needs.
        with store.engine.connect() as probe, probe.begin():
            probe.execute(sa.select(jobs.c.id).where(jobs.c.id == job).with_for_update(nowait=True)).all()
        other_txn.rollback()
        thread.join(10)
    assert not thread.is_alive()
    assert out["result"][0] == [0]
    assert [c.id for c in out["result"][1]] == [queued]


# -- the shared clock ---------------------------------------------------------------------------


def _server_now(store: JobStore) -> Any:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.now())).scalar_one()


def test_heartbeats_and_the_stale_threshold_go_by_the_servers_clock(
    pg_store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instances on hosts whose clocks disagree: one an hour behind claims and heartbeats, and its
    job is not stale to the others; one an hour ahead does not find the live job stale either.
    Heartbeat times were each host's own, so the first one's jobs were failed as dead."""
    job, _ = pg_store.create(new_job(user="skewed"), BIG)
    registry = InstanceRegistry(pg_store.engine, "behind")
    behind = lambda: datetime.now(UTC) - timedelta(hours=1)  # noqa: E731
    ahead = lambda: datetime.now(UTC) + timedelta(hours=1)  # noqa: E731
    for module in ("codex_runner.store.jobs", "codex_runner.store.instances", "codex_runner.store.records"):
        monkeypatch.setattr(f"{module}.utcnow", behind)
    registry.register()
    (claimed,) = pg_store.claim("behind", slots=1, max_jobs_per_user=1)
    row = pg_store.get_row(job["id"])
    assert row is not None and abs((row["heartbeat_at"] - _server_now(pg_store)).total_seconds()) < 5
    assert pg_store.heartbeat("behind", {job["id"]: claimed.lease_token}) == {job["id"]: "running"}
    assert registry.heartbeat()
    row = pg_store.get_row(job["id"])
    assert row is not None and abs((row["heartbeat_at"] - _server_now(pg_store)).total_seconds()) < 5
    for module in ("codex_runner.store.jobs", "codex_runner.store.instances", "codex_runner.store.records"):
        monkeypatch.setattr(f"{module}.utcnow", ahead)
    monkeypatch.setattr("codex_runner.store.schema.datetime", _Shifted)
    assert pg_store.stale_jobs(30) == []
    assert not pg_store.transition(job["id"], [Status.RUNNING], Status.FAILED, stale_after_seconds=30)
    assert not pg_store.fail_stale(
        job["id"], 30, event_type="heartbeat_stale_recovered", message="m", meta={}, values={}
    )
    assert InstanceRegistry(pg_store.engine, "other").live_instances(30) == ["behind"]
    assert pg_store.stale_jobs(-5)[0]["id"] == job["id"]  # and a stale one is still found


class _Shifted(datetime):
    """`datetime` with a clock an hour ahead (the host's clock, as the store's SQLite path reads it)."""

    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return datetime.now(tz) + timedelta(hours=1)


def test_an_instances_postgresql_connections_carry_its_runner_id(pg_database_url: str, tmp_path: Any) -> None:
    """`pg_stat_activity` tells an operator which instance holds which connection (sizing
    `max_connections`, a session stuck in a transaction): `codex-runner <RUNNER_ID>` for a
    service, `codex-runner` for a command, and a name the URL gives itself wins."""
    from codex_runner.config import load_settings
    from codex_runner.runtime import Runtime

    settings = load_settings(
        {"RUNNER_DATABASE_URL": pg_database_url, "RUNNER_DATA_DIR": str(tmp_path), "RUNNER_ID": "web-1"},
        cwd=tmp_path,
    )
    runtime = Runtime.open(settings)
    plain = create_store_engine(pg_database_url, pool_size=1)
    own = create_store_engine(f"{pg_database_url}?application_name=ops-console", pool_size=1)
    try:
        names = []
        for engine in (runtime.engine, plain, own):
            with engine.connect() as conn:
                names.append(conn.exec_driver_sql("SELECT current_setting('application_name')").scalar())
        assert names == ["codex-runner web-1", "codex-runner", "ops-console"]
    finally:
        runtime.close()
        plain.dispose()
        own.dispose()


@pytest.mark.parametrize(
    ("write", "op"), [("create", "jobs.create_many"), ("claim", "jobs.claim"), ("cancel", "jobs.cancel")]
)
def test_a_lost_commit_is_logged_with_the_write_it_was(
    pg_store: JobStore, monkeypatch: pytest.MonkeyPatch, write: str, op: str
) -> None:
    """`commit_outcome_unknown` said only the driver's error type: an operator could not tell a
    lost create from a lost claim or cancel. It names the store operation now, and nothing the
    write carried (no job id, user or argument)."""
    from structlog.testing import capture_logs

    job = new_job("zed-the-user")
    job_id = "" if write == "create" else pg_store.create(job, BIG)[0]["id"]
    _lose_commit_answers(monkeypatch, pg_store)
    calls = {
        "create": lambda: pg_store.create(job, BIG),
        "claim": lambda: pg_store.claim("r", slots=1, max_jobs_per_user=1),
        "cancel": lambda: pg_store.cancel(job_id, owner=None, actor="admin"),
    }
    with capture_logs() as logged, pytest.raises(CommitOutcomeUnknown):
        calls[write]()
    [entry] = [e for e in logged if e["event"] == "commit_outcome_unknown"]
    assert entry["op"] == op
    assert set(entry) == {"event", "log_level", "op", "error_type"}
    assert "zed-the-user" not in repr(entry) and (not job_id or job_id not in repr(entry))
