"""Several instances, each with its own data folder (docs/operations.md: each host its own
`RUNNER_DATA_DIR`): a job's log is a file in the `RUNNER_LOG_DIR` of the instance that ran it. An
instance whose log folder is another must not answer that log as empty and complete."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def test_a_log_in_another_instances_log_folder_is_an_error_not_an_empty_log(
    runner_factory: Any, tmp_path: Path
) -> None:
    runner_factory(RUNNER_ID="host-b", RUNNER_DATA_DIR=str(tmp_path / "data-b"))
    api = runner_factory(RUNNER_ID="api-a", RUNNER_ENABLED="false", RUNNER_DATA_DIR=str(tmp_path / "data-a"))
    beside = runner_factory(
        RUNNER_ID="api-b", RUNNER_ENABLED="false", RUNNER_DATA_DIR=str(tmp_path / "data-b")
    )

    job = api.submit({"stdout": "hello from host b"})
    done = api.wait(job["id"])
    assert done["status"] == "success" and done["runner_id"] == "host-b", done

    # The instance that shares the worker's data folder reads the log as ever.
    page = beside.client.get(f"/api/runner/jobs/{job['id']}/logs").json()
    assert "hello from host b" in page["content"] and page["is_complete"]

    # Another folder: an error that names the instance, not `content: ""` and `is_complete: true`
    # (and, streamed, no `end` event after nothing).
    r = api.client.get(f"/api/runner/jobs/{job['id']}/logs")
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "log_not_here" and "host-b" in r.json()["detail"]
    with api.client.stream("GET", f"/api/runner/jobs/{job['id']}/logs/stream", timeout=10) as streamed:
        assert streamed.status_code == 409
        assert b"log_not_here" in streamed.read()
