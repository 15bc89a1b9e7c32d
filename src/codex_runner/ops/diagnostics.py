"""`GET /api/runner/diagnostics`: what an admin needs to see at a glance."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from codex_runner.store.instances import InstanceRegistry

if TYPE_CHECKING:
    from codex_runner.runtime import Runtime


def collect(runtime: Runtime) -> dict[str, Any]:
    store = runtime.jobs
    snapshot = store.diagnostics_snapshot()
    return {
        "runner_id": runtime.settings.id,
        "queue_depth": store.counts_by_status(),
        **snapshot,
        "scheduler_lock": InstanceRegistry.scheduler_lock(runtime.engine),
        "startup_checks": runtime.startup_checks,
    }
