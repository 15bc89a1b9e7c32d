"""Two instances under one RUNNER_ID: the second would take the first one's jobs for its own
leftovers and kill them in start-up recovery. It refuses to start instead, with one line, while the
first is alive; a crashed or stopped holder frees the id (that restart is what recovery is for)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from codex_runner.errors import InstanceConflict
from codex_runner.store import create_store_engine
from codex_runner.store.instances import InstanceRegistry
from codex_runner.store.migrate import upgrade
from codex_runner.store.records import utcnow
from codex_runner.store.schema import instances

from tests.chaos.harness import Cluster, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("chaos")]


@pytest.mark.timeout(180)
def test_second_instance_under_a_live_runner_id_refuses_to_start(database_url: str, tmp_path: Path) -> None:
    with Cluster(tmp_path / "c", database_url) as c:
        first = c.start("dup-1", "worker")
        ids = c.submit(1, sleep=60.0)
        wait_for(lambda: c.running_of("dup-1") == set(ids), 60, "the job to run")

        second = c.start("dup-1", "worker", wait=False)
        assert second.proc.wait(timeout=60) != 0
        refusal = [line for line in c.tail(second, 200).splitlines() if "instance_conflict" in line]
        assert refusal == [
            f"error: RUNNER_ID 'dup-1' is in use by pid {first.pid} on {socket.gethostname()}, which "
            "heartbeated within the last 3 s; give each instance its own RUNNER_ID, or wait until that one "
            "has been stopped or silent for RUNNER_STALE_AFTER_SECONDS (instance_conflict)"
        ]
        assert "Traceback" not in c.tail(second, 200)
        # The first instance and its job were not touched.
        assert first.proc.poll() is None
        assert c.running_of("dup-1") == set(ids)

        # Stopped (a clean shutdown records it), the id is free again.
        first.proc.send_signal(signal.SIGTERM)
        first.proc.wait(timeout=60)
        c.start("dup-1", "worker")


def test_who_holds_an_id(database_url: str) -> None:
    engine = create_store_engine(database_url)
    upgrade(engine)
    try:
        registry = InstanceRegistry(engine, "holder-1")
        registry.register(30)
        registry.check_free(30)  # this very process: a restart in place, not a conflict

        def set_row(**values: object) -> None:
            with engine.begin() as conn:
                conn.execute(instances.update().where(instances.c.id == "holder-1").values(**values))

        set_row(host="another-host")
        with pytest.raises(InstanceConflict, match=r"in use by pid \d+ on another-host"):
            registry.check_free(30)
        with pytest.raises(InstanceConflict):
            registry.register(30)
        set_row(heartbeat_at=utcnow() - timedelta(seconds=31))  # silent too long: presumed dead
        registry.check_free(30)

        # This host: a live process that is not a runner (a reused pid) holds nothing; nor does a
        # pid that is gone.
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            set_row(host=socket.gethostname(), pid=sleeper.pid, heartbeat_at=utcnow())
            registry.check_free(30)
        finally:
            sleeper.kill()
            sleeper.wait()
        registry.check_free(30)
        set_row(host="another-host", heartbeat_at=utcnow(), stopped_at=utcnow())
        registry.check_free(30)  # stopped cleanly: free, whoever it was
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(instances)).scalar() == 1
    finally:
        engine.dispose()
