"""`/readyz` against a PostgreSQL server that accepts connections and never answers them (a frozen
server, a stuck proxy): "not ready" within seconds, not a request that hangs. And what ends the
full-disk outage it reports as not ready (`store/fullness.py`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from codex_runner.api import create_app
from codex_runner.store import JobStore

from tests.api.conftest import build_runtime
from tests.helpers import FreezingProxy, serve_app, wait_until


@pytest.fixture
def proxy() -> Iterator[FreezingProxy]:
    p = FreezingProxy()
    try:
        yield p
    finally:
        p.frozen = False
        p.close()


def test_readyz_says_not_ready_in_seconds_when_the_database_stops_answering(
    pg_database_url: str, proxy: FreezingProxy, tmp_path: Path
) -> None:
    """It checked on a pooled connection, which the pool first pinged: with the server silent both
    waited for ever (two minutes in the report that found it), and so did every probe after it."""
    url = pg_database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    runtime = build_runtime(tmp_path, url)
    try:
        with serve_app(create_app(runtime)) as base:
            assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
            proxy.frozen = True
            started = time.monotonic()
            first = httpx.get(f"{base}/readyz", timeout=20)
            assert first.status_code == 503 and first.json()["code"] == "unavailable"
            assert time.monotonic() - started < 6
            started = time.monotonic()
            assert httpx.get(f"{base}/readyz", timeout=20).status_code == 503
            assert time.monotonic() - started < 6
            proxy.frozen = False
            assert wait_until(lambda: httpx.get(f"{base}/readyz", timeout=20).status_code == 200, timeout=20)
    finally:
        runtime.close()


def test_a_probe_stuck_on_the_server_holds_one_thread_and_the_next_answers_at_once(tmp_path: Path) -> None:
    """Connected, then no answer (the server froze mid-check): the check goes on in its one thread,
    and every probe meanwhile answers "not ready" at once instead of starting another."""
    from codex_runner.store.engine import DatabaseProbe

    probe = DatabaseProbe(f"sqlite:///{tmp_path / 'p.db'}", timeout=0.5)
    release = threading.Event()
    real = probe._check
    calls = []

    def stuck() -> None:
        calls.append(1)
        release.wait(10)
        real()

    probe._check = stuck  # type: ignore[method-assign]
    try:
        started = time.monotonic()
        assert asyncio.run(probe.answers()) is False
        assert 0.4 < time.monotonic() - started < 3
        started = time.monotonic()
        assert asyncio.run(probe.answers()) is False
        assert time.monotonic() - started < 0.2 and len(calls) == 1
        release.set()
        assert wait_until(lambda: asyncio.run(probe.answers()), timeout=10)
    finally:
        release.set()
        probe.close()


def test_the_probe_uses_psycopg_3_like_the_store() -> None:
    """It took the URL as given: under SQLAlchemy 2.0 (which pyproject allows) `postgresql://`
    means psycopg2, not installed, and every probe was a 500."""
    from codex_runner.store.engine import DatabaseProbe

    probe = DatabaseProbe("postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        assert probe._engine.url.drivername == "postgresql+psycopg"
    finally:
        probe.close()


def test_a_request_to_a_silent_database_answers_503_instead_of_hanging(
    pg_database_url: str, proxy: FreezingProxy, tmp_path: Path
) -> None:
    """Every route but the health ones reads the tokens table: with the server frozen, a request
    waited until it answered again (for ever, under SIGSTOP). Now the statement's wait ends after
    RUNNER_DB_ANSWER_TIMEOUT_SECONDS, its connection is closed, and the next connection's
    connect timeout (5 s) is not tried again: 503 within seconds, and the instance recovers once
    the server answers."""
    url = pg_database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    runtime = build_runtime(tmp_path, url, RUNNER_DB_ANSWER_TIMEOUT_SECONDS="2")
    try:
        token, _ = runtime.tokens.create("alice", "user")
        headers = {"Authorization": f"Bearer {token}"}
        with serve_app(create_app(runtime)) as base:
            assert httpx.get(f"{base}/api/runner/jobs", headers=headers, timeout=10).status_code == 200
            proxy.frozen = True
            for _ in range(2):  # on the pooled connection, then on a new one
                started = time.monotonic()
                answer = httpx.get(f"{base}/api/runner/jobs", headers=headers, timeout=30)
                assert answer.status_code == 503 and answer.json()["code"] == "unavailable"
                assert time.monotonic() - started < 15  # 2 s of answer deadline + 5 s to connect
            proxy.frozen = False
            assert wait_until(
                lambda: httpx.get(f"{base}/api/runner/jobs", headers=headers, timeout=20).status_code == 200,
                timeout=20,
            )
    finally:
        runtime.close()


def test_a_silent_commit_is_reported_as_of_unknown_outcome(
    pg_database_url: str, proxy: FreezingProxy
) -> None:
    """A COMMIT whose answer never comes may have been applied: `CommitOutcomeUnknown`, not
    retried (a retry could apply it twice), and the frozen connection is not reused."""
    from codex_runner.errors import CommitOutcomeUnknown
    from codex_runner.store.engine import create_store_engine, with_retries, write_txn

    url = pg_database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    engine = create_store_engine(url, pool_size=1, answer_timeout=1)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (n int)"))

        def write() -> None:
            with write_txn(engine, op="test") as conn:
                conn.execute(sa.text("INSERT INTO t VALUES (1)"))
                proxy.frozen = True  # the INSERT got its answer; the COMMIT will not

        started = time.monotonic()
        with pytest.raises(CommitOutcomeUnknown):
            with_retries(write)
        assert time.monotonic() - started < 5
        proxy.frozen = False  # the COMMIT the proxy held reaches the server: it was applied after all

        def count() -> int:
            with engine.connect() as conn:
                return int(conn.execute(sa.text("SELECT count(*) FROM t")).scalar_one())

        assert wait_until(lambda: count() == 1, timeout=10)
    finally:
        proxy.frozen = False
        engine.dispose()


def test_migrations_have_no_answer_deadline(pg_database_url: str) -> None:
    """A migration waits for another instance's whole upgrade on a lock and may rewrite a big
    table: its connection has no time limit, every other one has."""
    from codex_runner.errors import StoreUnavailable
    from codex_runner.store.engine import create_store_engine, with_retries, without_answer_deadline

    engine = create_store_engine(pg_database_url, pool_size=1, answer_timeout=1)
    try:
        with engine.connect() as conn, without_answer_deadline(conn):
            conn.execute(sa.text("SELECT pg_sleep(1.5)"))

        def slow() -> None:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_sleep(1.5)"))

        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            with_retries(slow)
        assert time.monotonic() - started < 1.4  # not retried: another attempt would wait as long
        with engine.connect() as conn:  # the limit is back on the pooled connection
            assert conn.connection.dbapi_connection.answer_timeout == 1  # type: ignore[union-attr]
    finally:
        engine.dispose()


def test_a_full_disk_is_over_only_once_a_write_lands(store: JobStore) -> None:
    """Reads answer on a full disk, and so does a write transaction that writes nothing (a claim
    that finds no queued job): neither says the disk has room again, only a committed change does
    (`/readyz` stays 503 until then)."""
    from codex_runner.store import fullness
    from codex_runner.store.engine import write_txn
    from codex_runner.store.records import utcnow
    from codex_runner.store.schema import repos

    row = {"id": "r1", "name": "r1", "source_type": "local", "path_or_url": "/r1", "branch": "main"}
    row |= {"workspace": "worktree", "updated_at": utcnow()}
    engine = store.engine
    fullness.refused(engine)  # as a write a full disk refused
    with write_txn(engine, op="test") as conn:
        conn.execute(sa.select(repos.c.id)).all()
    with write_txn(engine, op="test") as conn:
        conn.execute(repos.update().where(repos.c.id == "no such repo").values(enabled=False))
    assert fullness.disk_full(engine)
    with pytest.raises(RuntimeError), write_txn(engine, op="test") as conn:
        conn.execute(repos.insert().values(**row))
        raise RuntimeError("rolled back")
    assert fullness.disk_full(engine)
    with write_txn(engine, op="test") as conn:
        conn.execute(repos.insert().values(**row))
    assert not fullness.disk_full(engine)


def test_a_create_while_the_database_is_silent_answers_503_and_creates_nothing(
    pg_database_url: str, proxy: FreezingProxy, tmp_path: Path
) -> None:
    """A create's token is looked up in its batch's worker thread (api/create.py): a database that
    stops answering there is the whole batch's `StoreUnavailable`, a 503 `unavailable` a client
    retries, not a 401 that tells it its token is bad; and no job is made."""
    url = pg_database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    runtime = build_runtime(tmp_path, url, RUNNER_DB_ANSWER_TIMEOUT_SECONDS="2")
    body = {"repo": "demo", "script_key": "echo", "args": {"message": "hi"}}
    try:
        token, _ = runtime.tokens.create("alice", "user")
        headers = {"Authorization": f"Bearer {token}"}
        with serve_app(create_app(runtime)) as base:
            assert httpx.get(f"{base}/api/runner/jobs", headers=headers, timeout=10).status_code == 200
            proxy.frozen = True
            started = time.monotonic()
            answer = httpx.post(f"{base}/api/runner/jobs", json=body, headers=headers, timeout=30)
            assert answer.status_code == 503, answer.text
            assert answer.json()["code"] == "unavailable"
            assert time.monotonic() - started < 15
            proxy.frozen = False

            def listed() -> int | None:
                got = httpx.get(f"{base}/api/runner/jobs", headers=headers, timeout=20)
                return int(got.json()["total"]) if got.status_code == 200 else None

            assert wait_until(lambda: listed() is not None, timeout=20)
            assert listed() == 0
    finally:
        runtime.close()
