"""What a job's leader gets, right after its spawn, that it must not inherit from the runner.

Set from the parent through `/proc` and `prlimit`, not in the child before exec: a `preexec_fn`
makes `subprocess` fork instead of vfork, which costs every dispatch (docs/performance.md). The
leader has only just exec'd when this runs, so processes it starts inherit the values; one forked
in the microseconds between would not, which no real program does.
"""

from __future__ import annotations

import errno
import functools
import os
import resource

import structlog

log = structlog.get_logger("codex_runner.execution")

#: How much likelier than the runner a job's process is to be chosen by the kernel's OOM killer
#: (`oom_score_adj`, -1000 to 1000): a job that runs the machine out of memory is killed (its job
#: fails, exit 137) before the runner that supervises every other job.
JOB_OOM_SCORE_ADJ = 500
#: The soft open-file limit the runner had before it raised its own for its HTTP connections
#: (ops/fdlimit.py); None while it did not. Jobs get this one back: a program that uses select()
#: breaks on a descriptor over 1023, which is why the usual soft limit is 1024.
_job_nofile: int | None = None


def keep_nofile_for_jobs(soft: int) -> None:
    """Records the soft open-file limit jobs get, before the runner raises its own."""
    global _job_nofile
    if _job_nofile is None:
        _job_nofile = soft


@functools.cache
def job_oom_score_adj() -> int | None:
    """The value for jobs: 500 above the runner's own, at least 500, at most 1000. None when the
    runner's own cannot be read (no /proc)."""
    try:
        with open("/proc/self/oom_score_adj", "rb") as fh:
            own = int(fh.read())
    except (OSError, ValueError):
        return None
    return min(1000, max(JOB_OOM_SCORE_ADJ, own + JOB_OOM_SCORE_ADJ))


def confine_leader(pid: int, max_processes: int = 0) -> None:
    """Applies the job's own limits to its freshly spawned leader; never raises (the job runs
    with the runner's values if the kernel refuses, e.g. for a set-user-ID program).
    `max_processes` (RUNNER_JOB_MAX_PROCESSES, 0: none) becomes its RLIMIT_NPROC, soft and hard,
    so that the job cannot raise it again."""
    if max_processes > 0:
        _set_nproc(pid, max_processes)
    if _job_nofile is not None:
        try:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (_job_nofile, hard))
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                log.debug("job_nofile_not_set", pid=pid, error=exc.strerror)
    value = job_oom_score_adj()
    if value is None:
        return
    try:
        fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ESRCH):  # not gone already (a trivial job)
            log.debug("job_oom_score_not_set", pid=pid, error=exc.strerror)


def _set_nproc(pid: int, limit: int) -> None:
    """RLIMIT_NPROC counts every process and thread of the job's *user*, the runner's own among
    them: a fork bomb stops at `limit` of them in all, while the runner, with its own higher
    limit, still starts threads, git and other jobs' leaders. The kernel ignores it for root."""
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_NPROC)
        value = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
        resource.prlimit(pid, resource.RLIMIT_NPROC, (value, value))
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            log.debug("job_nproc_not_set", pid=pid, error=exc.strerror)
