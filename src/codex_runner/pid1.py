"""A minimal init for when `serve` or `worker` is PID 1 (a container started without `--init`).

Processes that a job orphans (a daemon whose parent died) are re-parented to PID 1, and PID 1 must
reap them or they stay zombies. The runner itself waits only for its own children: reaping every
child would steal the exit statuses its git commands wait for. So, as tini does, PID 1 forks: the
child runs the runner, and PID 1 does nothing but forward signals to it and reap every process
that ends, and exits with the runner's status when the runner ends.

Written by hand rather than taken from a library: it is the one dependency-free loop below, and
`tini` remains the documented choice for images that can add it. `RUNNER_NO_INIT=1` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import NoReturn

#: Signals PID 1 passes on to the runner. Everything else reaching PID 1 is ignored, as the kernel
#: does for a PID 1 without handlers; SIGKILL and SIGSTOP cannot be caught anyway.
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)


def become_init_if_pid1() -> None:
    """Returns at once unless this process is PID 1. As PID 1 it forks: the child returns and runs
    the runner; this process never returns (see the module's docstring)."""
    if os.getpid() != 1 or os.environ.get("RUNNER_NO_INIT") == "1":
        return
    from codex_runner.ops.hardening import seal_process

    # Before the fork, so both halves are: this one holds the runner's environment (its secrets)
    # for as long as it runs, and a job's `cat /proc/1/environ` read them (ops/hardening.py).
    seal_process()
    child = os.fork()
    if child == 0:
        # A group of its own: a terminal's Ctrl-C reaches PID 1 only, which passes it on once, so
        # the runner never takes one keypress for the "second signal" that exits at once.
        os.setpgid(0, 0)
        return
    _supervise(child)


def _supervise(child: int) -> NoReturn:
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)  # any child: the runner, or an orphan it inherited
        except ChildProcessError:
            os._exit(0)  # no child at all: the runner is gone and its status was already taken
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)  # killed by signal N: 128 + N, as a shell
