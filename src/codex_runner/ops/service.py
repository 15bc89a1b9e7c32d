"""Hooks for `serve` (and `worker`): what runs once at start-up and what runs beside the server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from codex_runner.ops.audit import attach
from codex_runner.ops.doctor import startup
from codex_runner.ops.logging import configure_logging
from codex_runner.ops.retention import retention_loop

if TYPE_CHECKING:
    from codex_runner.runtime import Runtime


def on_startup(runtime: Runtime, *, checks: bool = True) -> None:
    """Service logs, the audit log listener, then the start-up checks (which raise `ConfigError`
    on a blocking problem only with RUNNER_PRODUCTION=true). Call it after `Runtime.open` and
    before the launcher starts, so the first job event is already audited."""
    configure_logging(runtime.settings)
    attach(runtime)
    if checks:
        startup(runtime)


async def background_chores(runtime: Runtime) -> None:
    """Runs until cancelled: retention, one instance at a time (see `ops.retention`)."""
    await retention_loop(runtime)
