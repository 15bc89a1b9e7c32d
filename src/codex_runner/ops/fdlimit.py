"""The process's open-file limit (RLIMIT_NOFILE) against `RUNNER_HTTP_MAX_CONNECTIONS`.

Each HTTP connection takes a file descriptor, as do a job's pipes and log files, the database's
connections and the service's own files. The cap on connections keeps room for the rest only if the
limit is above it: `serve` (and a worker with a metrics port) raises its soft limit as far as the cap
needs, never past the hard limit, and `doctor` warns when the hard limit is too low. The soft limit
is raised only that far, not to the hard limit. Jobs get the soft limit from before the raise back
right after their spawn (`execution/limits.py`): a program that uses `select()` breaks on a
descriptor over 1023 (why systemd leaves services a soft limit of 1024).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import structlog

from codex_runner.api.gate import MAX_REFUSED_LINGERING
from codex_runner.config import Settings
from codex_runner.execution.limits import keep_nofile_for_jobs
from codex_runner.execution.sandbox import MAX_KEPT_DESCRIPTORS

log = structlog.get_logger("codex_runner.fdlimit")

#: Descriptors kept for all but the connections: listeners, the database pool, the service and
#: audit logs, inotify, log reads of the API; and per running job (pipes, pidfd, log files, git,
#: a spawn's Landlock ruleset). The sandbox's kept rule descriptors come on top (`sandbox_fds`).
FDS_RESERVED = 256
FDS_PER_JOB = 16


@dataclass(frozen=True)
class FdLimit:
    soft: int
    hard: int
    needed: int

    @property
    def room(self) -> bool:
        """True when the hard limit leaves room for the cap (what `raise_fd_limit` reaches)."""
        return self.hard == resource.RLIM_INFINITY or self.hard >= self.needed


def fds_needed(settings: Settings) -> int:
    return (
        settings.http_max_connections
        + MAX_REFUSED_LINGERING
        + FDS_RESERVED
        + FDS_PER_JOB * settings.max_concurrency
        + sandbox_fds(settings)
    )


def sandbox_fds(settings: Settings) -> int:
    """The rule descriptors the Landlock plans may keep open between spawns (execution/sandbox.py),
    however many jobs run; none when isolation is off, as no plan is ever made then."""
    return 0 if settings.job_isolation == "off" else MAX_KEPT_DESCRIPTORS


def current(settings: Settings) -> FdLimit:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return FdLimit(soft, hard, fds_needed(settings))


def raise_fd_limit(settings: Settings) -> FdLimit:
    """Raises the soft limit to what the cap needs, or to the hard limit if that is lower; never
    lowers it. Returns the limit after."""
    limit = current(settings)
    if limit.soft == resource.RLIM_INFINITY or limit.soft >= limit.needed:
        return limit
    target = limit.needed if limit.room else limit.hard
    if target <= limit.soft:
        return limit
    keep_nofile_for_jobs(limit.soft)  # jobs get the limit back right after their spawn
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, limit.hard))
    except (ValueError, OSError) as exc:
        # Not expected (an unprivileged process may raise its soft limit to the hard one), but a
        # sandbox may refuse it: the server still runs, with the limit it had.
        log.warning("fd_limit_not_raised", soft=limit.soft, wanted=target, error=str(exc))
        return limit
    log.info("fd_limit_raised", soft_before=limit.soft, soft=target, hard=limit.hard)
    return FdLimit(target, limit.hard, limit.needed)
