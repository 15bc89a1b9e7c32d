"""A job's scripts run as the runner's user, and Linux lets a process read the environment and the
memory of another process of its user: `cat /proc/$PPID/environ` gave any script the runner's
RUNNER_ENCRYPTION_KEY and RUNNER_JWT_SECRET. `serve` and `worker` make themselves non-dumpable
(ops/hardening.py), which closes those files to processes without CAP_SYS_PTRACE."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.test_cli import CLI, start_server, stop
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(120)

KEY = "5e" * 32
JWT_SECRET = "jwt-secret-that-no-script-may-read-0123456789"


def _unprivileged() -> list[str]:
    """What makes a command run as an ordinary user's would: as root (the test's user here) every
    process holds every capability, CAP_SYS_PTRACE among them, which reads any process's /proc
    whatever this test checks; without them, root's processes are a user like any other."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without util-linux's setpriv: cannot run as an ordinary user")
    return [setpriv, "--bounding-set=-all", "--inh-caps=-all"]


def _read(path: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*_unprivileged(), "cat", path], capture_output=True, timeout=10)


def test_a_process_of_the_runners_user_cannot_read_its_secrets(tmp_path: Path) -> None:
    # The reader does read a process of the same user that is not sealed: the checks below mean
    # something.
    with subprocess.Popen([*_unprivileged(), "sleep", "30"], env={"PROBE": JWT_SECRET}) as plain:
        try:
            assert wait_until(lambda: _read(f"/proc/{plain.pid}/cmdline").stdout.startswith(b"sleep"))
            got = _read(f"/proc/{plain.pid}/environ")
            assert got.returncode == 0 and JWT_SECRET.encode() in got.stdout, got.stderr
        finally:
            plain.kill()

    secrets = {"RUNNER_ENCRYPTION_KEY": KEY, "RUNNER_JWT_SECRET": JWT_SECRET}
    server = start_server(tmp_path / "serve", enabled=True, wrapper=_unprivileged(), **secrets)
    worker: subprocess.Popen[bytes] | None = None
    try:
        got = _read(f"/proc/{server.proc.pid}/environ")
        assert got.returncode != 0 and b"Permission denied" in got.stderr, got
        assert KEY.encode() not in got.stdout and JWT_SECRET.encode() not in got.stdout
        mem = _read(f"/proc/{server.proc.pid}/mem")
        assert mem.returncode != 0 and b"Permission denied" in mem.stderr, mem

        with (tmp_path / "worker.log").open("wb") as log:
            worker = subprocess.Popen(
                [*_unprivileged(), CLI, "worker"],
                env={**server.env, "RUNNER_ID": "sealed-worker"},
                cwd=server.root,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        pid = worker.pid
        # Sealed once it has started up (before its launcher): until then the read may succeed.
        assert wait_until(lambda: _read(f"/proc/{pid}/environ").returncode != 0, timeout=30, interval=0.2), (
            tmp_path / "worker.log"
        ).read_text(errors="replace")
        time.sleep(0.5)
        assert worker.poll() is None, (tmp_path / "worker.log").read_text(errors="replace")
    finally:
        if worker is not None:
            stop(worker)
        stop(server.proc)
