"""Waiting for a job and following its log, shared by `submit --wait/--follow` and `jobs logs -f`.

The log follower pages `GET /jobs/{id}/logs` today. It is the one place that knows how log bytes
arrive, so switching to the SSE route (`/logs/stream`) later changes only `LogFollower`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import quote

from codex_runner.cli.client import RunnerClient, patiently
from codex_runner.cli.common import ExitCode

TERMINAL = frozenset({"success", "failed", "canceled", "timeout"})
EXIT_BY_STATUS = {
    "success": ExitCode.OK,
    "failed": ExitCode.JOB_FAILED,
    "timeout": ExitCode.JOB_TIMEOUT,
    "canceled": ExitCode.JOB_CANCELED,
}
STATUS_POLL_SECONDS = 0.25
LOG_POLL_SECONDS = 0.5
LOG_PAGE_BYTES = 65536


def jobs_path(job_id: str, *rest: str) -> str:
    # Job ids come from argv: keep them one path segment, whatever they contain.
    return "/".join(["/api/runner/jobs", quote(job_id, safe=""), *rest])


@dataclass
class LogFollower:
    """A job's redacted log from `offset`, chunk by chunk."""

    client: RunnerClient
    job_id: str
    offset: int = 0
    poll_seconds: float = LOG_POLL_SECONDS
    complete: bool = False

    def chunks(self, *, follow: bool, deadline: float | None = None) -> Iterator[str]:
        """Without `follow`: what is there now. With it: until the job ends and all is read, or
        until `deadline` (a `time.monotonic()` value) passes; `complete` tells which."""
        path = jobs_path(self.job_id, "logs")
        while True:
            params = {"offset": self.offset, "limit": LOG_PAGE_BYTES}
            page: dict[str, Any] = patiently(partial(self.client.get, path, params))
            content = str(page.get("content") or "")
            if content:
                yield content
            self.offset = int(page.get("next_offset", self.offset))
            if page.get("is_complete"):
                self.complete = True
                return
            if content:
                continue  # more may be waiting right now: read it before sleeping
            if not follow or (deadline is not None and time.monotonic() >= deadline):
                return
            time.sleep(self.poll_seconds)


def wait_for_job(
    client: RunnerClient,
    job_id: str,
    *,
    on_poll: Callable[[dict[str, Any]], None],
    deadline: float | None = None,
    poll_seconds: float = STATUS_POLL_SECONDS,
) -> tuple[dict[str, Any], bool]:
    """(last job seen, whether it is terminal): polls until the job ends or `deadline` passes."""
    path = jobs_path(job_id)
    while True:
        job: dict[str, Any] = patiently(partial(client.get, path))
        on_poll(job)
        if job.get("status") in TERMINAL:
            return job, True
        if deadline is not None and time.monotonic() >= deadline:
            return job, False
        time.sleep(poll_seconds)
