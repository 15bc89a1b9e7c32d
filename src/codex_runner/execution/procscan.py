"""A job's processes found by a scan of /proc, and the kills and stops that use it.

A job's process group does not cover everything of the job: a process that left the group (a
daemon), the processes of a job whose runner crashed or whose run ended, the git of a stage a
cancel stops. They are found by `RUNNER_JOB_ID` in their environment, or by arguments that name
the job's own workspace. docs/execution.md ("Processes that left the group") and
docs/crash-safety.md ("Start-up recovery") say who scans when.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Collection
from pathlib import Path

import structlog

from codex_runner.execution.process import KILL_CONFIRM_SECONDS
from codex_runner.jobs import ID_PATTERN

# The launcher's logger, as when these lived in launcher.py: filters on it still match their lines.
log = structlog.get_logger("codex_runner.launcher")

#: The variable the runner puts in every script's environment (SPEC §3); children inherit it, so it
#: finds a job's processes even when no pid was recorded or a process left the job's group.
JOB_ENV_PREFIX = b"RUNNER_JOB_ID="
#: The job id after `<a workspace root>/` in a process's argument list.
_JOB_ID_AFTER_ROOT = re.compile(rb"(%s)(?:/|$)" % ID_PATTERN.encode())
# The `RUNNER_WORKSPACE_DIR`s of the launchers of this process (as given and resolved, with a
# trailing slash): a process that lost `RUNNER_JOB_ID` is still the job's when its arguments name
# the job's own workspace (`register_workspace_root`).
_workspace_roots: set[bytes] = set()


def register_workspace_root(workspace_dir: Path) -> None:
    """Lets `find_job_processes` know the jobs' workspaces under `workspace_dir`."""
    for form in (os.path.abspath(workspace_dir), os.path.realpath(workspace_dir)):
        _workspace_roots.add(os.fsencode(form.rstrip("/")) + b"/")


def find_job_processes(
    job_ids: Collection[str] | None = None, *, git_stage_only: bool = False
) -> dict[str, list[int]]:
    """Live processes whose environment holds `RUNNER_JOB_ID=<id>`, by job id (all ids, or only
    `job_ids`); with `git_stage_only`, only the git of a stage a cancel may stop (prepare, commit,
    push: `RUNNER_GIT_STAGE`), never the cleanup's. Reads /proc/<pid>/environ, so it sees processes
    of our own user (or all, as root); zombies have no environment left and are skipped.

    A process that started again with an environment of its own making has no `RUNNER_JOB_ID`
    left: codex's sandbox helper (bubblewrap, in a session of its own, with nothing but PATH),
    which outlived codex when codex failed. Such a process of our own user is the job's too when
    its arguments name the job's own workspace (`<workspace dir>/<job id>`, which no other job
    can reach); an `in_place` job's workspace is its repo, which the next job shares, so not
    there."""
    found: dict[str, list[int]] = {}
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        job_id = _job_of_process(entry.name, git_stage_only)
        if job_id is not None and (job_ids is None or job_id in job_ids):
            found.setdefault(job_id, []).append(int(entry.name))
    return found


def _job_of_process(pid: str, git_stage_only: bool) -> str | None:
    """The job process `pid` belongs to (`find_job_processes`), or None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            environ = fh.read()
    except PermissionError:
        # A process that made itself non-dumpable (an ssh-agent) hides its environment from a
        # runner without CAP_SYS_PTRACE; its arguments are still readable.
        return None if git_stage_only else _job_of_arguments(pid)
    except OSError:
        return None
    variables = environ.split(b"\0")
    if git_stage_only and not any(var.startswith(b"RUNNER_GIT_STAGE=") for var in variables):
        return None
    for var in variables:
        if var.startswith(JOB_ENV_PREFIX):
            return var[len(JOB_ENV_PREFIX) :].decode("utf-8", "replace")
    return None if git_stage_only else _job_of_arguments(pid)


def _job_of_arguments(pid: str) -> str | None:
    """The job whose workspace the arguments of process `pid` name, if it is our user's."""
    if not _workspace_roots:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
        for arg in cmdline.split(b"\0"):
            for root in _workspace_roots:
                if arg.startswith(root) and (m := _JOB_ID_AFTER_ROOT.match(arg, len(root))):
                    # As root every process's arguments are readable: another user's is not ours.
                    return m[1].decode() if os.stat(f"/proc/{pid}").st_uid == os.geteuid() else None
    except OSError:
        return None
    return None


def kill_job_processes(
    job_ids: Collection[str], *, timeout: float, git_stage_only: bool = False, outside: int | None = None
) -> int:
    """SIGKILLs every process of these jobs and its process group, again until none is found or
    `timeout` passes (a process may fork between scan and kill); with `outside`, only those out of
    that process group. Returns how many were signalled."""
    if not job_ids:
        return 0
    signalled = 0
    deadline = time.monotonic() + timeout
    while True:
        found = _outside_group(find_job_processes(job_ids, git_stage_only=git_stage_only), outside)
        if not found:
            return signalled
        for pid, pgid in found:
            kill_group(pgid, pid)
            signalled += 1
        if time.monotonic() >= deadline:
            log.warning("job_processes_survived_sigkill", job_ids=sorted(found))
            return signalled
        time.sleep(0.05)


def stop_job_processes(job_ids: Collection[str], *, grace: float, group: int) -> int:
    """SIGTERM (and SIGCONT) to every live process of these jobs out of the process group `group`,
    up to `grace` seconds for them to go, then `kill_job_processes` for those. For a job stopped by
    cancel, timeout or shutdown, while its group gets the same from `JobProcess.terminate`: the
    processes it left outside its group get the group's treatment (SPEC §3), before its terminal
    status rather than at the next sweep (codex runs the model's commands in process groups of
    their own when it has no sandbox). The group's own are left alone: a second SIGTERM is "stop
    now" to many programs, and a SIGKILL here would cut their grace short. Returns how many
    processes were signalled."""
    found = _outside_group(find_job_processes(job_ids), group)
    if not found:
        return 0
    for pid, _ in found:
        for sig in (signal.SIGTERM, signal.SIGCONT):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
    deadline, delay = time.monotonic() + grace, 0.005
    while time.monotonic() < deadline and _outside_group(find_job_processes(job_ids), group):
        # Short first: most processes go at once, and a cancel's answer waits for this.
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.1)
    return len(found) + kill_job_processes(job_ids, timeout=KILL_CONFIRM_SECONDS, outside=group)


def _outside_group(found: dict[str, list[int]], group: int | None) -> list[tuple[int, int]]:
    """(pid, pgid) of the processes `find_job_processes` found, but for those in `group`; none for
    a process gone meanwhile."""
    out = []
    for pids in found.values():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                pgid = os.getpgid(pid)
                if pgid != group:
                    out.append((pid, pgid))
    return out


def kill_group(pgid: int, pid: int) -> None:
    # Never our own group (or init's): a job process always leads or joins a session of its own,
    # so a pgid equal to ours means something unexpected and only the process itself is killed.
    if pgid > 1 and pgid != os.getpgrp():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


__all__ = [
    "JOB_ENV_PREFIX",
    "find_job_processes",
    "kill_group",
    "kill_job_processes",
    "register_workspace_root",
    "stop_job_processes",
]
