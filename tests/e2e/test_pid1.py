"""`codex-runner serve` as PID 1 of its own PID namespace, as in a container started without an
init: a process a job orphans is re-parented to PID 1 and must be reaped there, not left a zombie.
Needs `unshare --pid`: as root, or as any user through a user namespace of its own
(`helpers.pid_namespace`); skipped with the reason where it is refused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import CLI, answers_healthz, cli_token, free_port, pid_namespace, wait_until

pytestmark = pytest.mark.timeout(90)

UNSHARE = pid_namespace()

# The job leaves a process in a session of its own that ends 0.3 s later, long after its parent:
# by then it is PID 1's child, and a zombie unless PID 1 reaps it.
TOML = """
[repos.scratch]
source = "{repo}"
workspace = "scratch"

[scripts.orphan]
command = ["/bin/sh", "-c", "setsid /bin/sleep 0.3 </dev/null >/dev/null 2>&1 & exit 0"]
"""


def _unshare_works() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    done = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=30)
    return None if done.returncode == 0 else f"unshare --pid refused here: {done.stderr.strip()[:200]}"


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


@pytest.fixture
def namespace_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, str, int]]:
    """(base URL, admin token, host pid of the namespace's PID 1) of a serve started as PID 1."""
    reason = _unshare_works()
    if reason:
        pytest.skip(reason)
    (tmp_path / "repo").mkdir()
    (tmp_path / "runner.toml").write_text(textwrap.dedent(TOML.format(repo=tmp_path / "repo")))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env |= {
        "RUNNER_CONFIG": str(tmp_path / "runner.toml"),
        "RUNNER_DATA_DIR": str(tmp_path / "data"),
        "RUNNER_PORT": str(port),
        "RUNNER_KILL_GRACE_SECONDS": "2",
        **request.param,
    }
    token = cli_token(env, tmp_path, "admin")
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen([*UNSHARE, CLI, "serve"], env=env, cwd=tmp_path, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: answers_healthz(url), timeout=30), (tmp_path / "serve.log").read_text()[
            -3000:
        ]
        [pid1] = _children(proc.pid)  # unshare --fork: its one child is PID 1 of the namespace
        yield url, token, pid1
        os.kill(pid1, signal.SIGTERM)  # forwarded to the runner, which stops gracefully
        # uvicorn raises the signal again once it has shut down, so the runner ends "killed by
        # SIGTERM" and PID 1 exits 128 + 15, as a shell would report it; as PID 1 itself the runner
        # is immune to that (the kernel ignores it) and exits 0.
        assert proc.wait(timeout=30) in (0, 128 + signal.SIGTERM)
        assert "launcher_stopped" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()  # unshare's child, PID 1, takes the whole namespace with it
            proc.wait(timeout=10)


def _run_orphaning_job(url: str, token: str) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
        job = client.post("/api/runner/jobs", json={"repo": "scratch", "script_key": "orphan", "args": {}})
        assert job.status_code == 201, job.text
        job_id = job.json()["id"]
        assert wait_until(lambda: client.get(f"/api/runner/jobs/{job_id}").json()["status"] == "success", 20)
    time.sleep(1.5)  # the orphan ends 0.3 s after the job


@pytest.mark.parametrize("namespace_server", [{}], indirect=True)
def test_pid1_reaps_what_jobs_orphan_and_forwards_sigterm(namespace_server: tuple[str, str, int]) -> None:
    url, token, pid1 = namespace_server
    [runner] = _children(pid1)  # before the job: the runner is PID 1's only child
    _run_orphaning_job(url, token)
    assert _children(pid1) == [runner]
    assert _state(runner) != "Z"


@pytest.mark.parametrize("namespace_server", [{"RUNNER_NO_INIT": "1"}], indirect=True)
def test_without_the_init_the_orphan_stays_a_zombie(namespace_server: tuple[str, str, int]) -> None:
    """The control: with RUNNER_NO_INIT=1 the runner itself is PID 1 and the orphan is left."""
    url, token, pid1 = namespace_server
    _run_orphaning_job(url, token)
    zombies = [p for p in _children(pid1) if _state(p) == "Z"]
    assert zombies, "the orphan was reaped without the init: the test shows nothing"
