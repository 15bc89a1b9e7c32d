"""A job's processes cannot reach the runner's own files (Landlock, execution/sandbox.py): the
database, other jobs' logs, run folders and workspaces; they still use their own workspace and
everything outside the runner's files. Real jobs through a real server."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from codex_runner.execution import process, sandbox

from tests.helpers import process_alive, wait_until
from tests.integration.conftest import Runner

pytestmark = pytest.mark.skipif(
    sandbox.abi_version() == 0, reason="this kernel has no Landlock (job isolation cannot be tested)"
)

EXTRA = """
[scripts.probe]
command = ["/bin/sh", "-c", "{cmd}"]

[scripts.probe.args.cmd]
type = "string"
max_length = 4000
"""

# One line per path: whether the job could read it.
READS = 'for f in "$@"; do if cat "$f" > /dev/null 2>&1; then echo "read $f"; else echo "denied $f"; fi; done'


def _probe(runner: Runner, paths: list[Path], before: str = "", user: str | None = None) -> dict[str, str]:
    quoted = " ".join(f"'{p}'" for p in paths)
    cmd = f"{before}\nset -- {quoted}\n{READS}"
    job = runner.submit({"cmd": cmd}, script="probe", user=user)
    done = runner.wait(job["id"])
    assert done["status"] == "success", done
    verdicts = {}
    for line in _log(runner, job["id"]).splitlines():
        word, _, path = line.partition(" ")
        if word in ("read", "denied") and path.startswith("/"):
            verdicts[path] = word
    return verdicts


def _log(runner: Runner, job_id: str) -> str:
    return str(
        runner.client.get(f"/api/runner/jobs/{job_id}/logs", params={"limit": 131072}).json()["content"]
    )


def _targets(runner: Runner, other_job: str) -> list[Path]:
    settings = runner.runtime.settings
    planted = settings.data_dir / "planted-secret"  # as an admin token file of the demo
    planted.write_text("secret\n")
    logs = sorted(settings.log_dir.rglob(f"{other_job}*"))
    assert logs, "the first job's log file"
    database = [Path(settings.database_url.split("///", 1)[1])] if settings.is_sqlite else []
    assert all(p.is_file() for p in database)
    return [
        planted,
        logs[0],
        runner.runtime.settings.runs_dir / other_job / "manifest.json",
        runner.tmp / "repo" / "README.md",  # outside the runner's files
        *database,
    ]


def test_a_job_cannot_read_the_database_or_another_jobs_files(runner_factory: Callable[..., Runner]) -> None:
    runner = runner_factory(extra_toml=EXTRA)
    first = runner.submit({"cmd": "echo first > mine.txt"}, script="probe", user="alice")
    assert runner.wait(first["id"])["status"] == "success"
    paths = _targets(runner, first["id"])
    verdicts = _probe(runner, [*paths, Path("mine.txt")], before="echo mine > mine.txt", user="bob")
    expected = {str(p): "denied" for p in paths}
    expected[str(paths[3])] = "read"
    assert verdicts == expected, verdicts


def test_the_job_writes_and_reads_its_own_workspace(runner_factory: Callable[..., Runner]) -> None:
    runner = runner_factory(extra_toml=EXTRA)
    job = runner.submit(
        {
            "cmd": 'mkdir -p a/b && echo x > a/b/f && mv a/b/f g && cat g && test "$(pwd)" = "$RUNNER_WORKSPACE"'
        },
        script="probe",
    )
    assert runner.wait(job["id"])["status"] == "success"
    assert "x" in _log(runner, job["id"]).splitlines()


def test_isolation_off_lets_the_job_read_them_which_is_what_the_default_prevents(
    runner_factory: Callable[..., Runner],
) -> None:
    runner = runner_factory(extra_toml=EXTRA, RUNNER_JOB_ISOLATION="off")
    first = runner.submit({"cmd": "true"}, script="probe")
    assert runner.wait(first["id"])["status"] == "success"
    paths = _targets(runner, first["id"])
    verdicts = _probe(runner, paths)
    assert set(verdicts.values()) == {"read"}, verdicts


def test_required_fails_the_job_where_the_kernel_cannot_confine_it(
    runner_factory: Callable[..., Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "abi_version", lambda: 0)
    runner = runner_factory(extra_toml=EXTRA, RUNNER_JOB_ISOLATION="required")
    job = runner.wait(runner.submit({"cmd": "echo ran"}, script="probe")["id"])
    assert job["status"] == "failed" and job["error_code"] == "spawn_failed", job
    assert "Landlock" in job["error_message"]


def test_auto_runs_the_job_unconfined_where_the_kernel_cannot(
    runner_factory: Callable[..., Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "abi_version", lambda: 0)
    runner = runner_factory(extra_toml=EXTRA)
    first = runner.submit({"cmd": "true"}, script="probe")
    assert runner.wait(first["id"])["status"] == "success"
    assert set(_probe(runner, _targets(runner, first["id"])).values()) == {"read"}


@pytest.mark.parametrize("mode", ["worktree", "clone"])
def test_a_confined_job_uses_git_in_a_workspace_made_from_a_mirror_in_the_data_folder(
    runner_factory: Callable[..., Runner], tmp_path: Path, mode: str
) -> None:
    """A URL repo's mirror lives in the data folder: a worktree's `.git` is a file naming the
    mirror (granted whole), a clone borrows the mirror's objects (granted read-only). git inside
    the job works; the mirror's other files stay out of a clone's reach for writing."""
    import subprocess

    seed = tmp_path / "seed"
    subprocess.run(["git", "init", "-q", "-b", "main", str(seed)], check=True)
    (seed / "a.txt").write_text("a\n")
    git = ["git", "-C", str(seed), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "a"], check=True)
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(seed), str(bare)], check=True)
    extra = (
        EXTRA
        + f"""
[repos.url]
source = "file://{bare}"
branch = "main"
workspace = "{mode}"
commit = false
"""
    )
    runner = runner_factory(extra_toml=extra)
    cmd = "git log -1 --format=%s && git status --porcelain && cat a.txt"
    job = runner.wait(runner.submit({"cmd": cmd}, repo="url", script="probe")["id"])
    assert job["status"] == "success", job
    lines = _log(runner, job["id"]).splitlines()
    assert "a" in lines and "a" in lines[lines.index("a") + 1 :], lines  # the subject, then a.txt
    if mode == "clone":
        # A clone's own git folder is in its workspace; the mirror it borrows from is read-only.
        alternates = next(runner.runtime.settings.mirrors_dir.glob("*.git")) / "HEAD"
        probe = f'echo x >> "{alternates}" 2>/dev/null && echo mirror-written || echo mirror-read-only'
        second = runner.wait(runner.submit({"cmd": probe}, repo="url", script="probe")["id"])
        assert "mirror-read-only" in _log(runner, second["id"]), _log(runner, second["id"])


# A client that says whether it could connect to the abstract unix socket named by its argument.
_CONNECT = """import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect("\\0" + sys.argv[1])
    print("connected", sys.argv[1])
except OSError as e:
    print("refused", sys.argv[1], e.strerror)
"""
# The job's own server on an abstract socket, and its own client: inside one job they still talk.
_OWN = """import socket, subprocess, sys
srv = socket.socket(socket.AF_UNIX)
srv.bind("\\0" + sys.argv[1])
srv.listen(1)
subprocess.run([sys.executable, sys.argv[2], sys.argv[1]], check=True)
"""


@pytest.mark.skipif(sandbox.abi_version() < 6, reason="abstract unix socket scoping needs Landlock ABI 6")
def test_a_job_cannot_connect_to_an_abstract_unix_socket_outside_it(
    runner_factory: Callable[..., Runner], out: Path
) -> None:
    """Abstract unix sockets have no file, so the file rules do not cover them: without the
    scope, a job reaches any listener of the machine's network namespace (another job's language
    server, a container runtime's shim, the runner's own were it to have one)."""
    import socket
    import sys
    import uuid

    runner = runner_factory(extra_toml=EXTRA)
    (out / "connect.py").write_text(_CONNECT)
    (out / "own.py").write_text(_OWN)
    outside = f"codex-runner-test-{uuid.uuid4().hex}"
    own = f"codex-runner-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind("\0" + outside)  # as the runner, or a process of another job
        listener.listen(1)
        python = sys.executable
        cmd = f"{python} {out}/connect.py {outside} && {python} {out}/own.py {own} {out}/connect.py"
        job = runner.submit({"cmd": cmd}, script="probe")
        done = runner.wait(job["id"])
    lines = _log(runner, job["id"]).splitlines()
    assert done["status"] == "success", lines
    assert f"connected {own}" in lines, lines
    assert any(line.startswith(f"refused {outside}") for line in lines), lines


@pytest.mark.skipif(sandbox.abi_version() < 6, reason="signal scoping needs Landlock ABI 6")
@pytest.mark.parametrize("end", ["exit", "cancel"])
def test_a_process_that_sheds_every_mark_of_its_job_still_ends_with_it(
    runner_factory: Callable[..., Runner], out: Path, end: str
) -> None:
    """A daemon out of the job's session, with an empty environment (no RUNNER_JOB_ID), its
    working directory out of the workspace and nothing of it in its arguments: neither the group
    kill nor the /proc scan can tell it is the job's. It is still in the job's Landlock domain,
    and whatever the domain holds is killed before the job's terminal status (SPEC §3), whether
    the script ended by itself or was canceled."""

    runner = runner_factory(extra_toml=EXTRA)
    pidfile = out / "escaped"
    daemon = f"echo $$ > {pidfile}; cd /; exec sleep 300"
    wait = "sleep 60" if end == "cancel" else "true"
    cmd = (
        f"setsid env -i /bin/sh -c '{daemon}' < /dev/null > /dev/null 2>&1 &\n"
        f"while [ ! -s {pidfile} ]; do sleep 0.01; done; {wait}"
    )
    job = runner.submit({"cmd": cmd}, script="probe")
    assert wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=20)
    pid = int(pidfile.read_text())
    try:
        if end == "cancel":
            assert runner.client.post(f"/api/runner/jobs/{job['id']}/cancel").status_code == 202
        done = runner.wait(job["id"])
        assert done["status"] == ("canceled" if end == "cancel" else "success"), done
        assert wait_until(lambda: not process_alive(pid), timeout=1), "the daemon outlived its job"
    finally:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)
