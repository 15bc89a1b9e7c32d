"""The runner's own process, closed to the jobs it starts.

Every job runs as the runner's user (docs/git.md), and Linux lets a process read another process
of its user through /proc: `/proc/<runner>/environ` holds the environment the runner started with
(RUNNER_ENCRYPTION_KEY, RUNNER_JWT_SECRET, a PostgreSQL URL with its password; `os.environ` changes
after start do not reach it), and `/proc/<runner>/mem` everything it has in memory. A script, or a
command an agent runs, needs nothing but `cat /proc/$PPID/environ` (SPEC §3: the runner's secrets
never reach the script). A process that is not "dumpable" is shielded from that: its /proc entries
are owned by root and opened only with CAP_SYS_PTRACE, and it writes no core dump holding the
secrets. Its children are not affected: `execve` makes each program dumpable again, so a job's
processes can still be inspected (and the runner still finds a job's escaped processes by their
environment).

What it does not do: a runner that runs as root starts its jobs as root, with every capability,
and nothing shields it from them; and a job's processes still see one another and those of other
jobs (the runner's own git for a push among them, whose environment carries the credential for
that moment). Give mutually untrusted work a runner of its own user, host or container.
"""

from __future__ import annotations

import ctypes
import os

import structlog

log = structlog.get_logger("codex_runner.hardening")

_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3


def seal_process() -> bool:
    """Makes this process non-dumpable (see the module's doc); True when it is. Call it before the
    first job starts: the children started before inherit nothing of it, but they could read it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        # Not fatal: the runner works as before, as exposed as before; the operator hears it.
        log.warning("process_not_sealed", error=str(exc))
        return False
    return is_sealed()


def is_sealed() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)
