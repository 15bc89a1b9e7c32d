"""PostgreSQL goes away in the middle of a run (issue 6, acceptance 3): no job is lost or run
twice, the API answers 503 during the outage and 2xx after.

The test stops and starts a PostgreSQL server of its own (initdb in a temp dir, a free port), so it
disturbs nothing else and runs with the rest. Where no initdb is installed, the `disruptive`
variant restarts the shared server instead; run that one alone: `pytest -m disruptive -p no:xdist`."""

from __future__ import annotations

import contextlib
import glob
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import Cluster, check_invariants, free_port, http_status, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("chaos")]

#: Longer than RUNNER_STALE_AFTER_SECONDS (3 s): every heartbeat is stale when the database comes
#: back, and still no job may be failed as stale.
OUTAGE_SECONDS = 5.0


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PrivatePostgres:
    """A throwaway PostgreSQL server (trust auth, fsync off) in a temp dir on a free port."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        # Not under pytest's tmp dir: as root, the server runs as `postgres`, which cannot enter it.
        self.root = Path(tempfile.mkdtemp(prefix="cr-chaos-pg-"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bindir / program), *args], check=True, capture_output=True, timeout=120
        )

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def _outage_run(tmp: Path, url: str, stop: Callable[[], None], start: Callable[[], None]) -> None:
    rng = random.Random()
    env = {"RUNNER_MAX_CONCURRENCY": "3", "RUNNER_MAX_JOBS_PER_USER": "6"}
    with Cluster(tmp / "cluster", url, env=env) as c:
        token, _ = c.runtime.tokens.create("admin", "admin")
        api = c.start("outage-s1", "serve")
        c.start("outage-w1", "worker")
        ids = [c.submit(1, user=f"u{i % 3}", sleep=rng.uniform(0.5, 2.5))[0] for i in range(36)]
        wait_for(lambda: sum(r["status"] == "success" for r in c.rows().values()) >= 6, 120, "6 jobs done")
        wait_for(lambda: len(c.running_of("outage-s1") | c.running_of("outage-w1")) >= 3, 30, "running jobs")
        assert http_status(api.url, "/api/runner/jobs?limit=1", token) == 200

        seen: list[int] = []
        stop_polling = threading.Event()

        def poll() -> None:
            while not stop_polling.is_set():
                seen.append(http_status(api.url, "/api/runner/jobs?limit=1", token))
                time.sleep(0.1)

        stop()
        down_at = time.monotonic()
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        # Jobs finish during the outage (sleeps of at most 2.5 s): their final writes must land later.
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
        saw_503_while_down = 503 in seen
        start()
        stop_polling.set()
        poller.join(timeout=30)
        assert saw_503_while_down, seen
        assert set(seen) <= {503, 200}, seen
        wait_for(lambda: http_status(api.url, "/api/runner/jobs?limit=1", token) == 200, 60, "the API")

        wait_for(lambda: c.all_done(ids), 180, "every job after the outage")
        rows = check_invariants(c)
        failed = {i: (r["status"], r["error_code"]) for i, r in rows.items() if r["status"] != "success"}
        assert not failed, f"jobs lost to the outage: {failed}"
        assert sorted(c.ledger_ids()) == sorted(ids), "a job ran twice or never"
        assert all(inst.proc.poll() is None for inst in c.instances), "an instance died in the outage"
        logs = "".join((c.tmp / f"{inst.runner_id}.log").read_text() for inst in c.instances)
        assert "database_unavailable" in logs and "database_reachable_again" in logs
        waited = logs.count("owner_write_waiting_for_database")
        print(
            f"API during the outage: {sorted(set(seen))}; {len(ids)} jobs all success; {waited} delayed writes"
        )


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("no initdb here: the disruptive variant covers this on the shared server")
    server = PrivatePostgres(bindir)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.mark.timeout(300)
def test_postgres_outage_loses_no_job(private_postgres: PrivatePostgres, tmp_path: Path) -> None:
    _outage_run(tmp_path, private_postgres.url, private_postgres.stop, private_postgres.start)


# -- the shared server (only where no private one can be made) ---------------------------------------


def _pg_cluster(action: str) -> None:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        check=False,
        timeout=60,
        capture_output=True,
    )


def _ensure_shared_pg_up() -> None:
    deadline = time.monotonic() + 90
    while subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-t", "2"], timeout=10).returncode:
        if time.monotonic() > deadline:
            raise AssertionError("PostgreSQL did not come back within 90 s")
        _pg_cluster("start")
        time.sleep(1)


@pytest.mark.disruptive
@pytest.mark.timeout(300)
def test_shared_postgres_restart_loses_no_job(pg_database_url: str, tmp_path: Path) -> None:
    if _bindir() is not None:
        pytest.skip("covered without disruption by test_postgres_outage_loses_no_job")
    if shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir():
        pytest.skip("needs a local PostgreSQL cluster managed by pg_ctlcluster")
    try:
        _outage_run(tmp_path, pg_database_url, lambda: _pg_cluster("stop"), _ensure_shared_pg_up)
    finally:
        _ensure_shared_pg_up()
