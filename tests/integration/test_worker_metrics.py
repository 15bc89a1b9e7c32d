"""`codex-runner worker` with RUNNER_WORKER_METRICS_PORT: its own /healthz, /readyz and /metrics
(admin token), real processes on SQLite. A worker's job counters count the jobs its own launcher
ran; before this setting a worker had no HTTP port and they were nowhere to be read."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.chaos.harness import CODEX_RUNNER, Cluster, free_port, wait_for

pytestmark = pytest.mark.timeout(120)


def _sample(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_a_worker_serves_the_counters_of_the_jobs_it_ran(tmp_path: Path) -> None:
    port = free_port()
    with Cluster(tmp_path / "cluster", f"sqlite:///{tmp_path / 'runner.db'}") as c:
        admin, _ = c.runtime.tokens.create("root", "admin")
        user, _ = c.runtime.tokens.create("alice", "user")
        worker = c.start("metrics-worker", "worker", RUNNER_WORKER_METRICS_PORT=str(port))
        ids = c.submit(3, sleep=0.05)
        wait_for(lambda: c.all_done(ids), 60, "the worker to run the jobs")
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            assert http.head("/healthz").status_code == 200
            assert http.get("/readyz").json() == {"status": "ready"}
            # The same auth as `serve`'s /metrics: a token, and an admin's.
            assert http.get("/metrics").status_code == 401
            denied = http.get("/metrics", headers={"Authorization": f"Bearer {user}"})
            assert denied.status_code == 403 and denied.json()["code"] == "forbidden"
            answer = http.get("/metrics", headers={"Authorization": f"Bearer {admin}"})
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"].startswith("text/plain")
            text = answer.text
            assert _sample(text, "runner_job_starts_total") == 3
            assert _sample(text, "runner_jobs_queued") == 0
            assert _sample(text, "runner_job_queue_wait_seconds_count") == 3
            # Its own requests are counted, by route template, as on `serve`.
            assert 'runner_http_requests_total{method="GET",route="/metrics",status="401"} 1.0' in text
            # Nothing else of the API is there: a worker answers no job route.
            assert (
                http.get("/api/runner/jobs", headers={"Authorization": f"Bearer {admin}"}).status_code == 404
            )

        # uvicorn in the worker must leave SIGTERM to the worker: it stops, and the port closes.
        os.kill(worker.pid, signal.SIGTERM)
        assert worker.proc.wait(timeout=30) == 0, c.tail(worker)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/healthz", timeout=5)
        assert "worker_metrics_serving" in c.tail(worker, 200)


def test_a_worker_whose_metrics_port_is_taken_claims_nothing(tmp_path: Path) -> None:
    """As `serve` with RUNNER_PORT: the port is bound before the launcher starts, so a taken one
    is one line naming the setting, exit 2, and no job claimed."""
    with Cluster(tmp_path / "cluster", f"sqlite:///{tmp_path / 'runner.db'}") as c:
        [job_id] = c.submit(1)
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen(1)
            taken = holder.getsockname()[1]
            env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
            env.update(c._env("taken-port", RUNNER_WORKER_METRICS_PORT=str(taken)))
            result = subprocess.run(
                [str(CODEX_RUNNER), "worker"],
                cwd=c.tmp,
                env=env,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=60,
            )
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.stderr
        assert f"RUNNER_WORKER_METRICS_PORT={taken}" in errors[0] and "already in use" in errors[0]
        assert c.rows([job_id])[job_id]["status"] == "queued"


def test_a_worker_metrics_port_holds_at_most_the_cap_of_connections(tmp_path: Path) -> None:
    """RUNNER_HTTP_MAX_CONNECTIONS bounds the metrics port too: one connection over it is answered
    503 at once, and a place freed is taken again."""
    port = free_port()
    with Cluster(tmp_path / "cluster", f"sqlite:///{tmp_path / 'runner.db'}") as c:
        c.start(
            "capped-worker", "worker", RUNNER_WORKER_METRICS_PORT=str(port), RUNNER_HTTP_MAX_CONNECTIONS="8"
        )
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(base), 30, "the metrics port to answer")
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
        try:
            refused = httpx.get(f"{base}/healthz", timeout=10)
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "unavailable"
            assert refused.headers["retry-after"] == "1"
            held.pop().close()
            wait_for(lambda: _answers(base), 10, "a freed place to be taken again")
        finally:
            for sock in held:
                sock.close()


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
