"""A script that writes 1 GiB to stdout, run by a real `codex-runner serve` process: the job
finishes, the runner's memory stays bounded, and the log stops at the cap (issue 3)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import CLI, cli_token, free_port, wait_until
from tests.integration.conftest import runner_settings

GIB = 1024**3
CAP = 8 * 1024 * 1024


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_one_gib_of_output_keeps_rss_bounded(tmp_path: Path) -> None:
    settings = runner_settings(tmp_path, f"sqlite:///{tmp_path / 'runner.db'}")
    port = free_port()
    env = {
        **os.environ,
        "RUNNER_CONFIG": str(tmp_path / "runner.toml"),
        "RUNNER_DATA_DIR": str(settings.data_dir),
        "RUNNER_PORT": str(port),
        "RUNNER_LOG_MAX_BYTES": str(CAP),
        "RUNNER_ID": "big-output",
    }
    token = cli_token(env, tmp_path, "big")
    server = subprocess.Popen(
        [CLI, "serve"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}
        )

        def healthy() -> bool:
            try:
                return client.get("/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(healthy, timeout=60)
        job: dict[str, Any] = client.post(
            "/api/runner/jobs", json={"repo": "scratch", "script_key": "behave", "args": {"bytes": GIB}}
        ).json()
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            job = client.get(f"/api/runner/jobs/{job['id']}").json()
            if job["status"] not in {"queued", "running"}:
                break
            time.sleep(0.5)
        assert job["status"] == "success", job
        assert _vm_hwm_kib(server.pid) < 150 * 1024
        log = settings.log_dir / f"{job['id']}.log"
        size = log.stat().st_size
        # Cut at a line or character boundary at or below the cap, then the one truncation line.
        assert CAP - 65536 <= size <= CAP + 4096
        tail = log.read_bytes()[-2048:].decode("utf-8", "replace")
        assert tail.count("[runner] log truncated") == 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
