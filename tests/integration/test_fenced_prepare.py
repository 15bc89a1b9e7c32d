"""An instance frozen during a job's prepare (SIGSTOP, a VM paused, a blocked disk) for longer
than RUNNER_STALE_AFTER_SECONDS has its job failed by another instance's watchdog meanwhile. Once
it ran again it started the script anyway — a job whose row says `failed` ran its script (and for
an in_place repo, in a folder the operator may be using again) until the next heartbeat noticed.
A prepare that took longer than a heartbeat interval now checks the job's lease first."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.integration.conftest import Runner


def test_a_job_failed_elsewhere_while_its_prepare_was_frozen_does_not_start_its_script(
    runner_factory: Callable[..., Runner], monkeypatch: pytest.MonkeyPatch, out: Path
) -> None:
    from codex_runner.execution import job as job_module
    from codex_runner.store.schema import jobs as jobs_table

    real_prepare = job_module.prepare_workspace

    def frozen_then_failed_elsewhere(repo: Any, job_id: str, settings: Any, *args: Any) -> Any:
        ws = real_prepare(repo, job_id, settings, *args)
        with runner.runtime.engine.begin() as conn:  # another instance's watchdog, meanwhile
            conn.execute(
                sa.update(jobs_table)
                .where(jobs_table.c.id == job_id)
                .values(status="failed", error_code="heartbeat_stale", lease_token=None)
            )
        time.sleep(settings.heartbeat_seconds + 0.3)  # frozen, past a heartbeat interval
        return ws

    # touch: the script's whole work done within a millisecond of its spawn, before any heartbeat
    # could notice the lost lease and stop it.
    runner = runner_factory(
        extra_toml='\n[scripts.touch]\ncommand = ["/bin/touch", "{path}"]\n[scripts.touch.args.path]\ntype = "string"\n'
    )
    monkeypatch.setattr(job_module, "prepare_workspace", frozen_then_failed_elsewhere)
    ran = out / "ran"
    job = runner.submit({"path": str(ran)}, script="touch")
    done = runner.wait(job["id"], timeout=30)
    assert (done["status"], done["error_code"]) == ("failed", "heartbeat_stale"), done
    time.sleep(1.5)  # a script that did start has long touched its file by now
    assert not ran.exists(), "the script of a job failed elsewhere ran"
