"""Instances whose runner.toml differ (a configuration rolled out host by host): a job that an
instance cannot run must say so, naming that instance, not that its script was removed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

EXTRA = """
[scripts.newer]
command = ["/bin/echo", "hello"]
"""


def test_a_job_claimed_by_an_instance_without_its_script_names_the_instance(
    runner_factory: Any, tmp_path: Path
) -> None:
    runner_factory(RUNNER_ID="old-config", RUNNER_DATA_DIR=str(tmp_path / "data-old"))
    api = runner_factory(
        extra_toml=EXTRA,
        RUNNER_ID="new-config",
        RUNNER_ENABLED="false",
        RUNNER_DATA_DIR=str(tmp_path / "data-new"),
    )
    job = api.submit(script="newer")
    done = api.wait(job["id"])
    assert done["status"] == "failed" and done["error_code"] == "prepare_failed", done
    message = done["error_message"]
    assert "'newer'" in message and "old-config" in message and "runner.toml" in message, message
    assert "no longer configured" not in message
