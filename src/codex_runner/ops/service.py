"""Hooks for `serve` (and `worker`): what runs once at start-up and what runs beside the server."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import structlog

from codex_runner.config import make_data_dir
from codex_runner.errors import ConfigError
from codex_runner.execution.agents import refresh_codex_home
from codex_runner.ops.audit import attach
from codex_runner.ops.doctor import startup
from codex_runner.ops.logging import configure_logging
from codex_runner.ops.retention import retention_loop

if TYPE_CHECKING:
    from codex_runner.runtime import Runtime

log = structlog.get_logger("codex_runner.service")


def on_startup(runtime: Runtime, *, checks: bool = True) -> None:
    """Service logs, the audit log listener, the runner's codex config, then the start-up checks
    (which raise `ConfigError` on a blocking problem only with RUNNER_PRODUCTION=true). Call it
    after `Runtime.open` and before the launcher starts, so the first job event is already audited
    and the first codex job reads this version's config.toml."""
    configure_logging(runtime.settings)
    with contextlib.suppress(OSError):  # the start-up checks' `folder:data` names the problem
        make_data_dir(runtime.settings)
    attach(runtime)
    try:
        refresh_codex_home(runtime.settings, runtime.catalog)
    except (OSError, ConfigError) as exc:
        # Not fatal: the jobs that need it fail with their own error; the others run.
        log.warning("codex_home_not_prepared", error=str(exc))
    if checks:
        startup(runtime)


async def background_chores(runtime: Runtime) -> None:
    """Runs until cancelled: retention, one instance at a time (see `ops.retention`)."""
    await retention_loop(runtime)
