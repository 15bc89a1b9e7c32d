"""`make run` on a fresh machine: `python -m codex_runner.demo` sets itself up in an empty folder,
serves, and the command it prints works as printed. A second run reuses everything."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import answers_healthz, free_port, wait_until

START_TIMEOUT = 60
STOP_TIMEOUT = 30
COMMAND_TIMEOUT = 120


@dataclass
class Demo:
    proc: subprocess.Popen[bytes]
    log: Path
    url: str

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    return tmp_path


@pytest.fixture
def env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNNER_", "GIT_"))}
    # A HOME of its own: the test then sees whether the demo wrote any git config there.
    env.update(HOME=str(workdir / "home"), RUNNER_PORT=str(free_port()))
    return env


def start_demo(workdir: Path, env: dict[str, str], run: int) -> Demo:
    log = workdir / f"demo-{run}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "codex_runner.demo"],
            cwd=workdir,
            env=env,
            stdout=fh,
            stderr=fh,
            start_new_session=True,
        )
    demo = Demo(proc, log, f"http://127.0.0.1:{env['RUNNER_PORT']}")

    def healthy() -> bool:
        if proc.poll() is not None:
            return True
        return answers_healthz(demo.url)

    if not wait_until(healthy, timeout=START_TIMEOUT, interval=0.1) or proc.poll() is not None:
        stop(proc)
        pytest.fail(f"the demo did not become healthy:\n{demo.output()[-4000:]}")
    return demo


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)


@pytest.fixture
def demos() -> Iterator[list[Demo]]:
    started: list[Demo] = []
    yield started
    for demo in started:
        stop(demo.proc)


def printed_command(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if " submit demo demo " in line]
    assert len(lines) == 1, output
    return lines[0]


def test_demo_sets_up_serves_and_its_printed_command_works(
    workdir: Path, env: dict[str, str], demos: list[Demo]
) -> None:
    demo = start_demo(workdir, env, run=1)
    demos.append(demo)
    output = demo.output()
    demo_dir = workdir / ".runner-data" / "demo"
    token_file = demo_dir / "admin-token"
    assert ".runner-data/demo/admin-token" in output
    assert demo.url in output
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert not (workdir / "runner.toml").exists()
    assert not (workdir / "home" / ".gitconfig").exists()
    repo = demo_dir / "demo-repo"
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "main"], capture_output=True, text=True, timeout=30, check=True
    ).stdout

    # Run the next command exactly as printed, in a shell, from the same folder.
    command = printed_command(output)
    client_env = {k: v for k, v in env.items() if k not in {"RUNNER_PORT", "RUNNER_ENABLED"}}
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=workdir,
        env=client_env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    job_id = result.stdout.strip().splitlines()[0]
    token = token_file.read_text().strip()
    job = httpx.get(
        f"{demo.url}/api/runner/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}, timeout=10
    ).json()
    assert job["repo"] == "demo" and job["script_key"] == "demo"
    assert job["args"]["message"] == "hello"
    if "--wait" in command:
        assert job["status"] == "success", job
        assert f"job {job_id} success" in result.stderr
    else:
        assert job["status"] == "queued"

    # A second run reuses the repo, the config and the token, and serves again.
    stop(demo.proc)
    config_before = (demo_dir / "runner.toml").read_text()
    mtime_before = (demo_dir / "runner.toml").stat().st_mtime_ns
    time.sleep(0.01)
    again = start_demo(workdir, env, run=2)
    demos.append(again)
    assert token_file.read_text().strip() == token
    assert (demo_dir / "runner.toml").read_text() == config_before
    assert (demo_dir / "runner.toml").stat().st_mtime_ns == mtime_before
    assert (
        subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "main"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        == head
    )
    assert printed_command(again.output()) == command
    listed = httpx.get(
        f"{again.url}/api/runner/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=10
    ).json()
    assert job_id in [j["id"] for j in listed["items"]]


def test_a_demo_whose_port_is_taken_says_so_in_one_line(workdir: Path, env: dict[str, str]) -> None:
    """`make run` twice: the second demo's `serve` could not bind and printed a traceback (the
    demo ran `serve` without the command line's error handling)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["RUNNER_PORT"])))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "codex_runner.demo"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: RUNNER_PORT="), done.stderr
