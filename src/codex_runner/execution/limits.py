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

import structlog

log = structlog.get_logger("codex_runner.execution")

#: How much likelier than the runner a job's process is to be chosen by the kernel's OOM killer
#: (`oom_score_adj`, -1000 to 1000): a job that runs the machine out of memory is killed (its job
#: fails, exit 137) before the runner that supervises every other job.
JOB_OOM_SCORE_ADJ = 500


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


def confine_leader(pid: int) -> None:
    """Applies the job's own limits to its freshly spawned leader; never raises (the job runs
    with the runner's values if the kernel refuses, e.g. for a set-user-ID program)."""
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
