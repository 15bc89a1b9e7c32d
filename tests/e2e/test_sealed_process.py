"""A job's scripts run as the runner's user, and Linux lets a process read the environment and the
memory of another process of its user: `cat /proc/$PPID/environ` gave any script the runner's
RUNNER_ENCRYPTION_KEY and RUNNER_JWT_SECRET. `serve` and `worker` make themselves non-dumpable
(ops/hardening.py), which closes those files to processes without CAP_SYS_PTRACE."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.test_cli import CLI, start_server, stop
from tests.helpers import pid_namespace, unprivileged, wait_until

pytestmark = pytest.mark.timeout(120)

KEY = "5e" * 32
JWT_SECRET = "jwt-secret-that-no-script-may-read-0123456789"


def _read(path: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*unprivileged(), "cat", path], capture_output=True, timeout=10)


def test_a_process_of_the_runners_user_cannot_read_its_secrets(tmp_path: Path) -> None:
    # The reader does read a process of the same user that is not sealed: the checks below mean
    # something.
    with subprocess.Popen([*unprivileged(), "sleep", "30"], env={"PROBE": JWT_SECRET}) as plain:
        try:
            assert wait_until(lambda: _read(f"/proc/{plain.pid}/cmdline").stdout.startswith(b"sleep"))
            got = _read(f"/proc/{plain.pid}/environ")
            assert got.returncode == 0 and JWT_SECRET.encode() in got.stdout, got.stderr
        finally:
            plain.kill()

    secrets = {"RUNNER_ENCRYPTION_KEY": KEY, "RUNNER_JWT_SECRET": JWT_SECRET}
    server = start_server(tmp_path / "serve", enabled=True, wrapper=unprivileged(), **secrets)
    worker: subprocess.Popen[bytes] | None = None
    try:
        got = _read(f"/proc/{server.proc.pid}/environ")
        assert got.returncode != 0 and b"Permission denied" in got.stderr, got
        assert KEY.encode() not in got.stdout and JWT_SECRET.encode() not in got.stdout
        mem = _read(f"/proc/{server.proc.pid}/mem")
        assert mem.returncode != 0 and b"Permission denied" in mem.stderr, mem

        with (tmp_path / "worker.log").open("wb") as log:
            worker = subprocess.Popen(
                [*unprivileged(), CLI, "worker"],
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


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_the_init_that_serve_is_as_pid_1_is_sealed_too(tmp_path: Path) -> None:
    """As PID 1 (a container without `--init`) `serve` forks: the child runs the runner and seals
    itself, the parent stays as init (codex_runner/pid1.py). That parent holds the same environment,
    and a job's `cat /proc/1/environ` read the secrets from it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("util-linux's unshare is missing")
    probe = subprocess.run([*pid_namespace(unshare), "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no PID namespace here: {probe.stderr.decode(errors='replace')[:200]}")
    # PID 1 of a namespace of its own; dies with `unshare` (the test's stop signals that).
    wrapper = [*pid_namespace(unshare), "--kill-child=SIGTERM", *unprivileged()]
    secrets = {"RUNNER_ENCRYPTION_KEY": KEY, "RUNNER_JWT_SECRET": JWT_SECRET}
    server = start_server(tmp_path / "serve", enabled=True, wrapper=wrapper, **secrets)
    try:
        [init] = _children(server.proc.pid)  # PID 1 in there
        [runner] = _children(init)
        assert b"codex-runner" in Path(f"/proc/{init}/cmdline").read_bytes()
        for pid in (init, runner):
            got = _read(f"/proc/{pid}/environ")
            assert got.returncode != 0 and b"Permission denied" in got.stderr, (pid, got)
            assert KEY.encode() not in got.stdout and JWT_SECRET.encode() not in got.stdout
    finally:
        stop(server.proc)
