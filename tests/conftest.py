"""Shared fixtures: real SQLite and PostgreSQL databases, skipped with a reason when a service is
absent (a failure in CI, where `CI=true`)."""

from __future__ import annotations

import os
import resource
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def pytest_configure(config: pytest.Config) -> None:
    """One test process builds hundreds of runtimes, and each keeps descriptors until the garbage
    collector or a cache lets them go (database pools, the job sandbox's rules: up to 8 sets of
    256 `O_PATH` descriptors); together they pass the soft open-file limit of 1024 that a login
    of an ordinary user gets (root's shell here had 20000). The test process takes its hard
    limit, as `serve` raises its own for its connections; tests that need a low limit set it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    if _port_open(host, port):
        return
    message = f"{name} is not answering on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing service is a failure)")
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _refills_taken() -> None:
    """A stop of the workspace layer's background work (a launcher's, a test's) lasts until a
    launcher starts again; a test that prepares workspaces without one expects spares made."""
    from codex_runner.execution.spares import resume_refills

    resume_refills()


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A command run in-process (typer's CliRunner: `cleanup`, `doctor`, `tokens`) configures the
    service log as the real one does, at WARNING for the operations commands: left so, every later
    test of the worker lost its INFO lines, and those that capture `job_finished` failed, by the
    order xdist happened to give the tests."""
    import logging

    import structlog

    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)


def _pg_url(dbname: str) -> str:
    return f"postgresql://postgres@127.0.0.1:5432/{dbname}"


#: Fixtures that migrate the test's database while they are set up, before the test's body runs:
#: a test using one of them gets its PostgreSQL database as a copy of one migrated once per test
#: process (`_pg_migrated_template`), which the fixture's own migration then finds at head. Its
#: body sees the same database either way; a migration run per test was over a tenth of a
#: second each, on three hundred tests. A new fixture of one of these names must migrate too.
MIGRATED_AT_SETUP = frozenset({"store", "pg_store", "api", "runner", "runtime", "engine"})


@pytest.fixture(scope="session")
def _pg_migrated_template() -> Iterator[str]:
    """A PostgreSQL database migrated to head, for this test process's copies. Nobody connects to
    it once it is made: PostgreSQL copies a template only while no session is on it."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    from codex_runner.store import create_store_engine
    from codex_runner.store.migrate import upgrade

    name = f"cr_template_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        engine = create_store_engine(_pg_url(name))
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        yield name
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def _sqlite_migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head, closed (its WAL checkpointed into it), for copies."""
    from codex_runner.store import create_store_engine
    from codex_runner.store.migrate import upgrade

    path = tmp_path_factory.mktemp("template") / "runner.db"
    engine = create_store_engine(f"sqlite:///{path}")
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    assert not path.with_name("runner.db-wal").exists()
    return path


@pytest.fixture
def pg_database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards: empty, or already migrated
    when a fixture of the test would migrate it before the test runs (`MIGRATED_AT_SETUP`)."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    name = f"cr_test_{uuid.uuid4().hex[:12]}"
    template = ""
    if MIGRATED_AT_SETUP.intersection(request.fixturenames):
        template = f' TEMPLATE "{request.getfixturevalue("_pg_migrated_template")}"'
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{template}')
    try:
        yield _pg_url(name)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every store and API test runs on both backends."""
    if request.param == "sqlite":
        path = tmp_path / "runner.db"
        if MIGRATED_AT_SETUP.intersection(request.fixturenames):
            shutil.copyfile(request.getfixturevalue("_sqlite_migrated_template"), path)
        return f"sqlite:///{path}"
    return str(request.getfixturevalue("pg_database_url"))


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL
