"""The job's processes: spawn in a session of their own, capture output, stop the whole group.

The script's program runs as the leader of a new session and process group (`setsid`, so
pgid == sid == pid). Everything it starts stays in that group unless it leaves on purpose, so the
group is the unit we signal, wait for and, after a crash, find again (SPEC §3). See
docs/execution.md for the whole model.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR
from typing import IO

import structlog

from codex_runner.errors import RunnerError
from codex_runner.execution.limits import confine_leader
from codex_runner.execution.sandbox import (
    ConfinementFailed,
    Domain,
    JobAccess,
    abi_version,
    refusal,
    run_confined,
)

log = structlog.get_logger("codex_runner.execution")

#: Variables every script gets from the runner's environment, when set there (SPEC §3).
BASE_ENV_NAMES: tuple[str, ...] = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
#: One read from a pipe, and so the most output of one stream held in memory (SPEC §5).
READ_CHUNK = 65536
STDERR_TAIL_BYTES = 8192
#: The raw stderr kept: twice the tail a stage records, so that the caller can redact before it
#: cuts (a secret across an 8 KiB raw cut would no longer match, and its end would show).
STDERR_KEEP_BYTES = 2 * STDERR_TAIL_BYTES
#: SIGTERM -> SIGKILL grace for processes the leader left behind when it exited by itself.
STRAY_GRACE_SECONDS = 1.0
#: How long to wait for a group to vanish after SIGKILL before giving up (D state, NFS hangs).
KILL_CONFIRM_SECONDS = 2.0
#: How long the pipes may stay open once the group is gone (a process that left the group with
#: setsid/setpgid can hold them forever); after that we close our ends and stop reading.
PIPE_EOF_SECONDS = 2.0

Sink = Callable[[bytes], None]


class SpawnFailed(RunnerError):
    """The script's program could not be started; the message says why in one line."""

    code = "spawn_failed"


def build_env(
    passthrough: Sequence[str], extra: Mapping[str, str], *, source: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The script's whole environment: `BASE_ENV_NAMES` and the `passthrough` names that exist in
    `source` (default `os.environ`), then `extra`, which wins. Nothing else ever passes.

    `RUNNER_*` names are never taken from `source`, even when listed: they are the runner's own
    settings and secrets (database URL, encryption key, tokens). The runner's values meant for the
    script (`RUNNER_JOB_ID`, `RUNNER_WORKSPACE`, `CODEX_HOME` from `RUNNER_CODEX_HOME`) go in `extra`.
    """
    if isinstance(passthrough, str):
        raise TypeError("passthrough is a sequence of names, not one string")
    origin: Mapping[str, str] = os.environ if source is None else source
    env: dict[str, str] = {}
    for name in (*BASE_ENV_NAMES, *passthrough):
        if name.startswith("RUNNER_"):
            continue
        value = origin.get(name)
        if value is not None:
            env[name] = value
    for name, value in extra.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise ValueError(f"invalid environment variable {name!r}")
        env[name] = value
    return env


@dataclass
class ProcessSpec:
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    stdin: bytes | None = None
    #: What the job's processes may reach (execution/sandbox.py); None: all the runner's user can.
    access: JobAccess | None = None
    #: RUNNER_JOB_ISOLATION: `required` fails the spawn where `access` cannot be enforced.
    isolation: str = "auto"
    #: RUNNER_JOB_MAX_PROCESSES: the leader's RLIMIT_NPROC (execution/limits.py); 0 leaves it.
    max_processes: int = 0


@dataclass
class ProcessOutcome:
    #: The leader's exit status; killed by signal N it is 128 + N (SPEC §3).
    exit_code: int
    #: N when the leader was killed by signal N.
    signal: int | None
    #: The last `STDERR_KEEP_BYTES` of standard error, raw, from the first line that starts in them:
    #: redact, then cut to `STDERR_TAIL_BYTES`.
    stderr_tail: bytes
    #: None when the leader exited by itself, else the first reason given to `terminate()`.
    reason: str | None
    #: From spawn to the leader's exit.
    duration_ms: int
    #: True when the leader exited by itself but left processes in its group that had to be killed.
    strays_killed: bool = False


@dataclass(frozen=True)
class _Stat:
    pid: int
    state: str
    pgrp: int
    session: int
    start_time: int


def _read_stat(pid: int) -> _Stat | None:
    # os.open/os.read rather than open(): no buffered file object for a one-line file, read once per
    # job and for every process of a /proc scan. One read returns it whole (a few hundred bytes).
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # Field 2 (comm) may contain spaces and parentheses: the fields we want follow the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        # Numbered as in proc(5): 3 state, 5 pgrp, 6 session, 22 starttime.
        return _Stat(pid, fields[0].decode(), int(fields[2]), int(fields[3]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def _all_stats() -> Iterator[_Stat]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _read_stat(int(entry.name))
            if stat is not None:
                yield stat


def group_pids(pgid: int) -> list[int]:
    """Every process whose group is `pgid`, zombies included (one /proc scan)."""
    return [s.pid for s in _all_stats() if s.pgrp == pgid]


def _live_members(pgid: int) -> list[_Stat]:
    # Zombies are dead: where PID 1 does not reap orphans (some containers) they stay forever.
    return [s for s in _all_stats() if s.pgrp == pgid and s.state not in ("Z", "X")]


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks after boot); None if no such pid."""
    stat = _read_stat(pid)
    return None if stat is None else stat.start_time


def group_alive(pgid: int) -> bool:
    """Whether process group `pgid` has a member that is not a zombie."""
    if pgid <= 1:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return bool(_live_members(pgid))


def _stop_group_sync(pgid: int, grace: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGCONT):
        _killpg(pgid, sig)
    if _poll_sync(pgid, grace):
        return
    _killpg(pgid, signal.SIGKILL)
    if not _poll_sync(pgid, KILL_CONFIRM_SECONDS):
        log.warning("process_group_survived_sigkill", pgid=pgid)


def _poll_sync(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while group_alive(pgid):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.1)
    return True


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def kill_process_group(pgid: int, *, leader_pid: int, leader_start_time: int, grace: float = 0.0) -> bool:
    """Stop a group a runner started in an earlier life (crash recovery); True if it signalled one.

    A pid is reused once its process is gone, so a recorded pid alone proves nothing. The rule:

    - If `leader_pid` exists (zombie included), the group is ours only if its starttime equals
      `leader_start_time` and it still leads group `pgid`. A recycled pid has another starttime.
    - If `leader_pid` is gone, the group is ours only if every live member of group `pgid` has
      session id == `pgid` and started no earlier than `leader_start_time`. Linux never hands out a
      pid while it is still some process's pgid or sid, so members in session `pgid` descend from the
      session our leader created with setsid.

    Then SIGTERM (and SIGCONT, so stopped members act on it) to the group, up to `grace` seconds,
    and SIGKILL. A group with no live member is left alone and gives False.
    """
    if pgid <= 1:
        return False
    leader = _read_stat(leader_pid)
    members = _live_members(pgid)
    if not members:
        return False
    if leader is not None:
        if leader.start_time != leader_start_time or leader.pgrp != pgid:
            return False
    elif any(m.session != pgid or m.start_time < leader_start_time for m in members):
        return False
    _stop_group_sync(pgid, grace)
    return True


def _program_exists(program: str, cwd: Path, env: Mapping[str, str]) -> bool:
    if "/" in program:
        return (cwd / program).exists()
    return shutil.which(program, path=env.get("PATH", os.defpath)) is not None


def _spawn_message(program: str, cwd: Path, env: Mapping[str, str], exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        if exc.filename is not None and str(exc.filename) == str(cwd):
            return f"working directory '{cwd}' does not exist"
        if _program_exists(program, cwd, env):
            return f"'{program}' could not be started: its interpreter was not found"
        return f"program '{program}' not found"
    if isinstance(exc, PermissionError):
        return f"'{program}' is not executable"
    if exc.errno == errno.ENOEXEC:
        return f"'{program}' is not in an executable format"
    return f"cannot start '{program}': {exc.strerror or exc}"


def _check_cwd(cwd: Path) -> None:
    try:
        mode = os.stat(cwd).st_mode  # one stat, where exists() and is_dir() made two
    except (FileNotFoundError, NotADirectoryError):
        raise SpawnFailed(f"working directory '{cwd}' does not exist") from None
    if not S_ISDIR(mode):
        raise SpawnFailed(f"working directory '{cwd}' is not a directory")


_unconfined_warned = False


def _spawn(
    spec: ProcessSpec, popen: Callable[[], subprocess.Popen[bytes]], domain: Domain
) -> subprocess.Popen[bytes]:
    """`popen()`, confined to `spec.access` when there is one and the kernel can (Landlock); then
    `domain` serves the job's domain where the kernel scopes signals."""
    global _unconfined_warned
    if spec.access is None or spec.isolation == "off":
        return popen()
    abi = abi_version()
    if abi > 0:
        try:
            return run_confined(spec.access, abi, popen, domain)
        except ConfinementFailed as exc:
            if spec.isolation == "required":
                raise
            problem = exc.message
    else:
        if spec.isolation == "required":
            raise ConfinementFailed(refusal())
        problem = refusal()
    if not _unconfined_warned:  # once: doctor's job_isolation check says it at every start
        _unconfined_warned = True
        log.warning("job_not_isolated", detail=problem)
    return popen()


class JobProcess:
    """One running script: its group, its output, its end. Create it with `start()`."""

    pid: int
    pgid: int

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        spec: ProcessSpec,
        sink: Sink,
        out_fd: int,
        err_fd: int,
        started: float,
        domain: Domain | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._domain = domain
        self._proc = proc
        self._exit: asyncio.Future[int] = self._loop.create_future()
        self._sink = sink
        self._stdout_tap: Sink | None = None
        self._started = started
        self.pid = proc.pid
        self.pgid = proc.pid  # setsid made the child leader of a new session and group
        self._start_time: int | None = None
        self.sink_errors = 0
        self._tail = bytearray()
        self._tail_cut = False  # whether stderr had more than the tail keeps
        self._open_fds: set[int] = set()
        self._drained = asyncio.Event()
        self._reason: str | None = None
        self._kill_task: asyncio.Task[None] | None = None
        self._kill_deadline = 0.0
        for fd, is_stderr in ((out_fd, False), (err_fd, True)):
            os.set_blocking(fd, False)
            self._loop.add_reader(fd, self._on_readable, fd, is_stderr)
            self._open_fds.add(fd)
        self._watch_exit()
        self._stdin: _StdinFeeder | None = None
        if spec.stdin is not None and proc.stdin is not None:
            self._stdin = _StdinFeeder(self._loop, proc.stdin, spec.stdin)
        # Runs whether or not anyone awaits wait(): once the leader exits, the rest of its group
        # must go too (SPEC §3), and a cancelled wait() must not stop that.
        self._supervisor = self._loop.create_task(self._supervise())

    @classmethod
    async def start(cls, spec: ProcessSpec, sink: Sink, *, stdout_tap: Sink | None = None) -> JobProcess:
        """Spawn `spec.argv` (no shell) in a new session; output goes to `sink` as it arrives, and
        standard output alone to `stdout_tap` too (a reader of a line protocol, which a stderr
        line landing inside a long stdout line would break).

        Raises SpawnFailed when the program is missing or not executable, or `spec.cwd` is missing.
        """
        argv = list(spec.argv)
        if not argv or not argv[0]:
            raise SpawnFailed("empty command")
        _check_cwd(spec.cwd)
        # Our own pipes rather than asyncio's stream readers: one os.read(READ_CHUNK) per wake-up
        # goes straight to the sink, so at most READ_CHUNK bytes of a stream are ever held, and the
        # two streams reach the sink in the order they arrived.
        out_r, out_w = os.pipe()
        try:
            err_r, err_w = os.pipe()
        except OSError:  # out of descriptors: the first pipe must not leak
            os.close(out_r)
            os.close(out_w)
            raise
        domain = Domain()
        try:
            # Popen on the loop, as asyncio's own subprocess support does (vfork + exec take well
            # under a millisecond), or, confined, in a thread of its own the loop waits for
            # (`sandbox.run_confined`); the exit is watched through a pidfd (`_watch_exit`)
            # instead of asyncio's child watcher, which starts a thread per child.
            proc = _spawn(
                spec,
                lambda: subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE if spec.stdin is not None else subprocess.DEVNULL,
                    stdout=out_w,
                    stderr=err_w,
                    cwd=spec.cwd,
                    env=spec.env,
                    start_new_session=True,
                    close_fds=True,
                ),
                domain,
            )
        except BaseException as exc:
            os.close(out_r)
            os.close(err_r)
            if isinstance(exc, ConfinementFailed):
                raise SpawnFailed(exc.message) from None
            if isinstance(exc, OSError):
                raise SpawnFailed(_spawn_message(argv[0], spec.cwd, spec.env, exc)) from None
            if isinstance(exc, ValueError):  # e.g. an embedded NUL in an argument
                raise SpawnFailed(f"cannot start '{argv[0]}': {exc}") from None
            raise
        finally:
            # Only the child may hold the write ends, so EOF means every writer of the job is gone.
            os.close(out_w)
            os.close(err_w)
        confine_leader(proc.pid, spec.max_processes)
        try:
            job_process = cls(proc, spec, sink, out_r, err_r, time.monotonic(), domain)
        except BaseException:
            domain.close()
            raise
        job_process._stdout_tap = stdout_tap
        return job_process

    @property
    def returncode(self) -> int | None:
        """The leader's exit status as `ProcessOutcome.exit_code` reports it; None while it runs."""
        rc = self._proc.returncode
        return None if rc is None else _exit_code(rc)[0]

    @property
    def ended(self) -> asyncio.Future[ProcessOutcome]:
        """Done with the outcome once `wait()` would return. For `asyncio.wait` and callbacks
        only: never cancel it, nor await it where a cancel could reach it (use `wait()`)."""
        return self._supervisor

    async def wait(self) -> ProcessOutcome:
        """The outcome, once the leader exited, both pipes hit EOF and the group is empty.

        Processes the leader leaves behind are stopped (SIGTERM, `STRAY_GRACE_SECONDS`, SIGKILL).
        Cancelling wait() stops neither the process nor that clean-up; call it again for the outcome.
        """
        return await asyncio.shield(self._supervisor)

    async def terminate(self, reason: str, grace: float) -> None:
        """SIGTERM the whole group, wait up to `grace` seconds, then SIGKILL it.

        Idempotent: later calls wait for the same stop (and may only shorten the grace). Returns once
        no live process is left in the group, or `KILL_CONFIRM_SECONDS` after SIGKILL at worst.
        """
        # A leader that already exited by itself is not stopped by this: a timer or a shutdown that
        # fires while its leftovers are cleaned up (up to STRAY_GRACE_SECONDS + PIPE_EOF_SECONDS)
        # must not turn its own exit into a timeout.
        if self._reason is None and not self._supervisor.done() and self._proc.returncode is None:
            self._reason = reason
        await self._stop_group(grace)

    async def _stop_group(self, grace: float) -> None:
        deadline = self._loop.time() + max(grace, 0.0)
        if self._kill_task is None:
            self._kill_deadline = deadline
            self._kill_task = self._loop.create_task(self._kill_group())
        else:
            self._kill_deadline = min(self._kill_deadline, deadline)
        await asyncio.shield(self._kill_task)

    async def _kill_group(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGCONT):
            self._signal_group(sig)
        if await self._group_gone_by(lambda: self._kill_deadline):
            return
        self._signal_group(signal.SIGKILL)
        confirm_by = self._loop.time() + KILL_CONFIRM_SECONDS
        if not await self._group_gone_by(lambda: confirm_by):
            log.warning("process_group_survived_sigkill", pgid=self.pgid)

    def _signal_group(self, sig: int) -> None:
        # The pgid names our group only while the unreaped leader or a live member holds it; after
        # that the number may be handed out again, so an empty group is never signalled.
        if self._proc.returncode is None or group_alive(self.pgid):
            _killpg(self.pgid, sig)

    async def _group_gone_by(self, deadline: Callable[[], float]) -> bool:
        delay = 0.005
        while group_alive(self.pgid):
            remaining = deadline() - self._loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)
        return True

    @property
    def start_time(self) -> int:
        """starttime of the leader (see `process_start_time`), recorded so that crash recovery
        never signals a recycled pid; 0 if it could not be read. Read on first use, at the latest
        when the leader exits and before it is reaped: until then its pid cannot be reused, so the
        read is always of this process. Not at spawn: right after exec, /proc/<pid>/stat often
        waits on the new program's set-up (about 90 µs on the loop on average, against 27 once it
        exited: bench/drain_inprocess.py --parts), and a trivial job has exited before anyone asks."""
        if self._start_time is None:
            self._start_time = process_start_time(self.pid) or 0
        return self._start_time

    def _watch_exit(self) -> None:
        """Resolves `_exit` with the leader's wait status once it exits, and reaps it. A pidfd
        becomes readable when its process exits: the loop watches it like any other descriptor.
        Kernels older than 5.3 have none: a thread waits for the child instead."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:
            self.start_time  # noqa: B018 (the thread reaps the leader as soon as it exits)
            threading.Thread(target=self._wait_blocking, name=f"waitpid-{self.pid}", daemon=True).start()
            return
        self._loop.add_reader(pidfd, self._on_pidfd, pidfd)

    def _on_pidfd(self, pidfd: int) -> None:
        self.start_time  # noqa: B018 (read while the exited leader is still unreaped; see there)
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 255 << 8  # reaped by someone else: the status is lost
        if pid == 0:
            return  # not exited after all
        self._loop.remove_reader(pidfd)
        os.close(pidfd)
        self._exited(os.waitstatus_to_exitcode(status))

    def _wait_blocking(self) -> None:
        try:
            _, status = os.waitpid(self.pid, 0)
            rc = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            rc = 255
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self._loop.call_soon_threadsafe(self._exited, rc)

    def _exited(self, rc: int) -> None:
        # Popen must know too: one that thinks its child unreaped would waitpid() the same pid
        # later, by then perhaps another process's.
        self._proc.returncode = rc
        if not self._exit.done():
            self._exit.set_result(rc)

    async def _supervise(self) -> ProcessOutcome:
        try:
            return await self._supervised()
        finally:
            if self._domain is not None:
                self._domain.close()

    async def _supervised(self) -> ProcessOutcome:
        rc = await asyncio.shield(self._exit)
        duration_ms = int((time.monotonic() - self._started) * 1000)
        alive = group_alive(self.pgid)
        strays = self._reason is None and alive
        if strays:
            log.info("killing_stray_processes", pgid=self.pgid)
        if self._kill_task is not None:
            await asyncio.shield(self._kill_task)  # a terminate() in progress keeps its own grace
        elif alive:
            await self._stop_group(STRAY_GRACE_SECONDS)
        # What left the group and every mark of the job (sandbox.Domain): before the terminal
        # status, and before the wait for the pipes, which such a process may hold.
        # Not logged: the group's own members that are zombies not yet reaped by init are in the
        # domain too, and count as signalled; which processes were alive would take a scan.
        if self._domain is not None:
            self._domain.kill_all()
        try:
            if not self._drained.is_set():  # mostly it is: the EOFs come with the exit
                await asyncio.wait_for(self._drained.wait(), PIPE_EOF_SECONDS)
        except TimeoutError:
            log.warning("output_pipes_held_open_after_exit", pgid=self.pgid)
            for fd in list(self._open_fds):
                self._close_reader(fd)
        if self._stdin is not None:
            self._stdin.close()
        exit_code, sig = _exit_code(rc)
        return ProcessOutcome(
            exit_code=exit_code,
            signal=sig,
            stderr_tail=self._whole_lines_tail(),
            reason=self._reason,
            duration_ms=duration_ms,
            strays_killed=strays,
        )

    def _whole_lines_tail(self) -> bytes:
        """The stderr tail from its first whole line: a tail that was cut may start inside a
        secret, whose rest no rule would know for one (`ghp_…` without its prefix, a value
        without its `key=`). A cut tail without a newline is one partial line: nothing."""
        tail = bytes(self._tail)
        if self._tail_cut:
            newline = tail.find(b"\n")
            tail = tail[newline + 1 :] if newline >= 0 else b""
        return tail

    def _on_readable(self, fd: int, is_stderr: bool) -> None:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close_reader(fd)
            return
        if is_stderr:
            self._tail += chunk
            if len(self._tail) > STDERR_KEEP_BYTES:
                self._tail_cut = True
                del self._tail[:-STDERR_KEEP_BYTES]
        # Apart: a log write that fails (a full disk) must not keep a chunk from the tap (codex's
        # event parser), which might hold the `turn.failed` that decides the job's status.
        try:
            self._sink(chunk)
        except Exception:
            # The child must never block on a full pipe, so a failing sink costs only this chunk.
            self.sink_errors += 1
            if self.sink_errors == 1:
                log.exception("output_sink_failed", pid=self.pid)
        if not is_stderr and self._stdout_tap is not None:
            try:
                self._stdout_tap(chunk)
            except Exception:
                self.sink_errors += 1
                log.exception("output_tap_failed", pid=self.pid)

    def _close_reader(self, fd: int) -> None:
        self._loop.remove_reader(fd)
        os.close(fd)
        self._open_fds.discard(fd)
        if not self._open_fds:
            self._drained.set()


class _StdinFeeder:
    """Writes `data` to the child's stdin as the pipe takes it, then closes it. Non-blocking, from
    the loop: a child that never reads its input must not block anything of ours."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stdin: IO[bytes], data: bytes) -> None:
        self._loop = loop
        self._stdin = stdin
        self._fd = stdin.fileno()
        self._rest = memoryview(data)
        self._watching = False
        os.set_blocking(self._fd, False)
        self._on_writable()
        if not self._stdin.closed:
            self._loop.add_writer(self._fd, self._on_writable)
            self._watching = True

    def _on_writable(self) -> None:
        try:
            while self._rest:
                self._rest = self._rest[os.write(self._fd, self._rest[:READ_CHUNK]) :]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass  # the child exited or closed its input early; what it reads is its business
        self.close()

    def close(self) -> None:
        if self._watching:
            self._loop.remove_writer(self._fd)
            self._watching = False
        if not self._stdin.closed:
            with contextlib.suppress(OSError):
                self._stdin.close()


def _exit_code(returncode: int) -> tuple[int, int | None]:
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, None
