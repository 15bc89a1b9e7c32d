"""The process layer against real processes: spawn, capture, exit mapping, group kill, recovery.

Every test runs on the stock asyncio loop and on uvloop (what `serve` runs under uvicorn), and every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from codex_runner.execution.process import (
    PIPE_EOF_SECONDS,
    STDERR_KEEP_BYTES,
    STDERR_TAIL_BYTES,
    STRAY_GRACE_SECONDS,
    JobProcess,
    ProcessOutcome,
    ProcessSpec,
    SpawnFailed,
    build_env,
    group_alive,
    kill_process_group,
    process_start_time,
)

PY = sys.executable
LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])

Runner = Callable[..., Any]


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Runner:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if request.param == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop

    def _run(coro: Coroutine[Any, Any, Any], timeout: float = 20.0) -> Any:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(asyncio.wait_for(coro, timeout))

    return _run


class Collector:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def __call__(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    async def wait_for(self, needle: bytes, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.data:
            assert time.monotonic() < deadline, f"{needle!r} not seen in {self.data!r}"
            await asyncio.sleep(0.01)


def alive(pid: int) -> bool:
    """Exists and is not a zombie (PID 1 here may never reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def make_spec(argv: list[str], cwd: Path, *, stdin: bytes | None = None) -> ProcessSpec:
    return ProcessSpec(argv=argv, cwd=cwd, env=build_env([], {}), stdin=stdin)


async def run_to_end(spec: ProcessSpec) -> tuple[ProcessOutcome, bytes]:
    sink = Collector()
    proc = await JobProcess.start(spec, sink)
    outcome = await proc.wait()
    return outcome, sink.data


@pytest.fixture
def reap_strays() -> Iterator[list[int]]:
    """Pids a test deliberately leaves outside the job's group; killed whatever happens."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- exit status and output ----------------------------------------------------------------------


def test_exit_zero(run: Runner, tmp_path: Path) -> None:
    async def scenario() -> tuple[ProcessOutcome, bytes, JobProcess]:
        sink = Collector()
        proc = await JobProcess.start(make_spec([PY, "-c", "print('hello')"], tmp_path), sink)
        assert proc.pgid == proc.pid
        assert proc.start_time in (0, process_start_time(proc.pid))
        return await proc.wait(), sink.data, proc

    outcome, data, proc = run(scenario())
    assert (outcome.exit_code, outcome.signal, outcome.reason) == (0, None, None)
    assert data == b"hello\n"
    assert outcome.duration_ms >= 0
    assert proc.returncode == 0
    assert not outcome.strays_killed


def test_nonzero_exit_keeps_last_8_kib_of_stderr(run: Runner, tmp_path: Path) -> None:
    code = "import sys; sys.stderr.write(('x' * 99 + '\\n') * 200 + 'END'); sys.exit(3)"
    outcome, data = run(run_to_end(make_spec([PY, "-c", code], tmp_path)))
    assert outcome.exit_code == 3
    assert outcome.signal is None
    # Twice what a stage records (the job redacts first, then cuts to STDERR_TAIL_BYTES), from the
    # first whole line in it: 163 lines of 100 bytes and the 3 after them, of the last 16 KiB.
    assert STDERR_KEEP_BYTES == 2 * STDERR_TAIL_BYTES
    assert outcome.stderr_tail == b"x" * 99 + b"\n" + (b"x" * 99 + b"\n") * 162 + b"END"
    assert len(data) == 20003


def test_a_cut_stderr_tail_starts_at_a_whole_line(run: Runner, tmp_path: Path) -> None:
    """A tail cut inside a line (a secret whose start, with its prefix or its `key=`, fell before
    the cut would show its rest unrecognised) starts after that line; a cut tail that is one
    partial line is nothing. A tail that was not cut is kept whole, first line and all."""
    cut_inside = "import sys; sys.stderr.write('a' * 17000 + '\\nlast line\\n'); sys.exit(1)"
    outcome, _ = run(run_to_end(make_spec([PY, "-c", cut_inside], tmp_path)))
    assert outcome.stderr_tail == b"last line\n"
    one_line = "import sys; sys.stderr.write('ghp_' + 'b' * 17000); sys.exit(1)"
    outcome, _ = run(run_to_end(make_spec([PY, "-c", one_line], tmp_path)))
    assert outcome.stderr_tail == b""
    whole = "import sys; sys.stderr.write('first\\n' + 'c' * 16000); sys.exit(1)"
    outcome, _ = run(run_to_end(make_spec([PY, "-c", whole], tmp_path)))
    assert outcome.stderr_tail == b"first\n" + b"c" * 16000


def test_killed_by_signal_maps_to_128_plus_n(run: Runner, tmp_path: Path) -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    outcome, _ = run(run_to_end(make_spec([PY, "-c", code], tmp_path)))
    assert (outcome.exit_code, outcome.signal, outcome.reason) == (128 + 9, 9, None)

    outcome, _ = run(run_to_end(make_spec(["sh", "-c", "kill -USR1 $$"], tmp_path)))
    assert (outcome.exit_code, outcome.signal) == (128 + signal.SIGUSR1, signal.SIGUSR1)


# --- spawn failures ------------------------------------------------------------------------------


def test_missing_program_is_spawn_failed(run: Runner, tmp_path: Path) -> None:
    with pytest.raises(SpawnFailed) as info:
        run(JobProcess.start(make_spec(["no-such-program-cr"], tmp_path), Collector()))
    assert info.value.code == "spawn_failed"
    assert str(info.value) == "program 'no-such-program-cr' not found"

    with pytest.raises(SpawnFailed, match="program '/nonexistent/tool' not found"):
        run(JobProcess.start(make_spec(["/nonexistent/tool"], tmp_path), Collector()))


def test_out_of_descriptors_at_the_second_pipe_leaks_none(
    run: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pipe, made = os.pipe, []

    def pipe() -> tuple[int, int]:
        if made:
            raise OSError(24, "Too many open files")
        made.append(real_pipe())
        return made[-1]

    monkeypatch.setattr(os, "pipe", pipe)
    with pytest.raises(OSError, match="Too many open files"):
        run(JobProcess.start(make_spec([PY, "-c", "pass"], tmp_path), Collector()))
    for fd in made[0]:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed, not leaked


def test_non_executable_file_is_spawn_failed(run: Runner, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    with pytest.raises(SpawnFailed) as info:
        run(JobProcess.start(make_spec([str(script)], tmp_path), Collector()))
    assert str(info.value) == f"'{script}' is not executable"


def test_missing_interpreter_and_missing_cwd_are_spawn_failed(run: Runner, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    with pytest.raises(SpawnFailed, match="interpreter was not found"):
        run(JobProcess.start(make_spec([str(script)], tmp_path), Collector()))

    with pytest.raises(SpawnFailed, match=r"working directory '.*/gone' does not exist"):
        run(JobProcess.start(make_spec(["true"], tmp_path / "gone"), Collector()))

    with pytest.raises(SpawnFailed, match="empty command"):
        run(JobProcess.start(make_spec([], tmp_path), Collector()))


# --- standard input ------------------------------------------------------------------------------


def test_stdin_is_fed_then_closed(run: Runner, tmp_path: Path) -> None:
    prompt = b"fix the bug in widgets.py\n" * 20000  # ~500 KiB: more than a pipe buffer
    outcome, data = run(run_to_end(make_spec(["cat"], tmp_path, stdin=prompt)))
    assert outcome.exit_code == 0
    assert data == prompt


def test_child_that_ignores_stdin_does_not_block(run: Runner, tmp_path: Path) -> None:
    code = "import time; time.sleep(0.2); print('done')"
    outcome, data = run(run_to_end(make_spec([PY, "-c", code], tmp_path, stdin=b"z" * 1_000_000)), 10)
    assert (outcome.exit_code, data) == (0, b"done\n")


def test_no_stdin_is_dev_null(run: Runner, tmp_path: Path) -> None:
    code = "import os, sys; print(os.path.realpath('/proc/self/fd/0')); print(repr(sys.stdin.read()))"
    outcome, data = run(run_to_end(make_spec([PY, "-c", code], tmp_path)))
    assert outcome.exit_code == 0
    assert data.splitlines() == [b"/dev/null", b"''"]


# --- environment and working directory -----------------------------------------------------------


def test_environment_holds_only_allowed_names(
    run: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUPER_SECRET_TOKEN", "hunter2-hunter2-hunter2")
    monkeypatch.setenv("RUNNER_DATABASE_URL", "postgresql://runner:db-password-123@db/runner")
    monkeypatch.setenv("RUNNER_ENCRYPTION_KEY", "00" * 32)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-passthrough")
    monkeypatch.setenv("LANG", "C.UTF-8")
    env = build_env(
        ["OPENAI_API_KEY", "RUNNER_DATABASE_URL", "NOT_SET_ANYWHERE"],
        {"RUNNER_JOB_ID": "job-1", "RUNNER_WORKSPACE": str(tmp_path)},
    )
    spec = ProcessSpec(argv=["env", "-0"], cwd=tmp_path, env=env)
    outcome, data = run(run_to_end(spec))
    assert outcome.exit_code == 0
    seen = dict(item.split(b"=", 1) for item in data.split(b"\0") if item)
    allowed = {b"PATH", b"HOME", b"LANG", b"LC_ALL", b"TZ", b"OPENAI_API_KEY", b"RUNNER_JOB_ID"}
    assert set(seen) <= allowed | {b"RUNNER_WORKSPACE"}
    assert seen[b"OPENAI_API_KEY"] == b"sk-test-passthrough"
    assert seen[b"RUNNER_JOB_ID"] == b"job-1"
    assert seen[b"LANG"] == b"C.UTF-8"
    for secret in (b"hunter2", b"db-password-123", b"00" * 32):
        assert secret not in data


def test_build_env_rules() -> None:
    source = {"PATH": "/bin", "TZ": "UTC", "EDITOR": "vi", "RUNNER_TOKEN": "t", "CODEX_HOME": "/c"}
    env = build_env(
        ["CODEX_HOME", "RUNNER_TOKEN", "ABSENT"], {"RUNNER_JOB_ID": "j", "TZ": "X"}, source=source
    )
    assert env == {"PATH": "/bin", "TZ": "X", "CODEX_HOME": "/c", "RUNNER_JOB_ID": "j"}
    with pytest.raises(ValueError):
        build_env([], {"A=B": "x"}, source={})
    with pytest.raises(TypeError):
        build_env("PATH", {}, source={})


def test_runs_in_spec_cwd(run: Runner, tmp_path: Path) -> None:
    outcome, data = run(run_to_end(make_spec([PY, "-c", "import os; print(os.getcwd())"], tmp_path)))
    assert data.decode().strip() == os.path.realpath(tmp_path)
    assert outcome.exit_code == 0


# --- capture -------------------------------------------------------------------------------------


def test_stdout_and_stderr_merge_in_arrival_order(run: Runner, tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "for i in range(16):\n"
        "    stream = sys.stdout if i % 2 == 0 else sys.stderr\n"
        "    stream.write(f'line {i}\\n'); stream.flush(); time.sleep(0.03)\n"
    )
    outcome, data = run(run_to_end(make_spec([PY, "-c", code], tmp_path)))
    assert outcome.exit_code == 0
    assert data == b"".join(f"line {i}\n".encode() for i in range(16))
    assert outcome.stderr_tail == b"".join(f"line {i}\n".encode() for i in range(1, 16, 2))


def test_failing_sink_drops_output_but_keeps_draining(run: Runner, tmp_path: Path) -> None:
    def broken_sink(chunk: bytes) -> None:
        raise OSError("disk full")

    async def scenario() -> tuple[ProcessOutcome, int]:
        code = "import sys; sys.stdout.write('y' * 4_000_000); sys.stderr.write('tail')"
        proc = await JobProcess.start(make_spec([PY, "-c", code], tmp_path), broken_sink)
        return await proc.wait(), proc.sink_errors

    outcome, errors = run(scenario(), 15)
    assert outcome.exit_code == 0
    assert errors >= 2
    assert outcome.stderr_tail == b"tail"


# --- terminate -----------------------------------------------------------------------------------


def test_terminate_kills_group_with_term_ignoring_grandchild(run: Runner, tmp_path: Path) -> None:
    grace = 0.5
    # The grandchild prints its pid only once SIGTERM is ignored, then becomes `sleep`.
    script = "sh -c 'trap \"\" TERM; echo $$; exec sleep 1000' & wait"

    async def scenario() -> tuple[ProcessOutcome, int, float, int]:
        sink = Collector()
        proc = await JobProcess.start(make_spec(["sh", "-c", script], tmp_path), sink)
        await sink.wait_for(b"\n")
        grandchild = int(sink.data.split()[0])
        assert alive(grandchild)
        started = time.monotonic()
        await proc.terminate("cancel", grace)
        elapsed = time.monotonic() - started
        assert not alive(grandchild)
        assert not group_alive(proc.pgid)
        return await proc.wait(), grandchild, elapsed, proc.pgid

    outcome, grandchild, elapsed, pgid = run(scenario())
    # The grandchild ignored SIGTERM, so only SIGKILL after the grace could have stopped it.
    assert grace - 0.05 <= elapsed < grace + 1.0
    assert outcome.reason == "cancel"
    assert (outcome.exit_code, outcome.signal) == (128 + signal.SIGTERM, signal.SIGTERM)
    assert not outcome.strays_killed
    assert not alive(grandchild)
    assert not group_alive(pgid)


def test_terminate_is_idempotent_and_first_reason_wins(run: Runner, tmp_path: Path) -> None:
    async def scenario() -> tuple[ProcessOutcome, float]:
        proc = await JobProcess.start(make_spec(["sleep", "1000"], tmp_path), Collector())
        assert proc.returncode is None
        started = time.monotonic()
        await asyncio.gather(proc.terminate("timeout", 5), proc.terminate("cancel", 5))
        elapsed = time.monotonic() - started
        await proc.terminate("shutdown", 5)
        return await proc.wait(), elapsed

    outcome, elapsed = run(scenario())
    assert elapsed < 1.0  # sleep obeys SIGTERM: no need to sit out the grace
    assert outcome.reason == "timeout"
    assert outcome.exit_code == 128 + signal.SIGTERM


def test_terminate_grace_can_be_shortened_by_a_later_call(run: Runner, tmp_path: Path) -> None:
    script = "trap '' TERM; echo ready; while :; do sleep 0.05; done"

    async def scenario() -> tuple[ProcessOutcome, float]:
        sink = Collector()
        proc = await JobProcess.start(make_spec(["sh", "-c", script], tmp_path), sink)
        await sink.wait_for(b"ready")
        started = time.monotonic()
        first = asyncio.ensure_future(proc.terminate("cancel", 30))
        await asyncio.sleep(0.2)
        await proc.terminate("shutdown", 0)
        await first
        return await proc.wait(), time.monotonic() - started

    outcome, elapsed = run(scenario())
    assert elapsed < 2.0
    assert (outcome.reason, outcome.signal) == ("cancel", signal.SIGKILL)


def test_wait_is_cancellable(run: Runner, tmp_path: Path) -> None:
    async def scenario() -> ProcessOutcome:
        proc = await JobProcess.start(make_spec(["sleep", "1000"], tmp_path), Collector())
        waiter = asyncio.ensure_future(proc.wait())
        await asyncio.sleep(0.1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert proc.returncode is None and alive(proc.pid)
        await proc.terminate("shutdown", 2)
        first = await proc.wait()
        assert await proc.wait() is first
        return first

    outcome = run(scenario())
    assert outcome.reason == "shutdown"


# --- processes left behind by the leader ---------------------------------------------------------


def test_background_sleeper_is_killed_when_leader_exits(run: Runner, tmp_path: Path) -> None:
    async def scenario() -> tuple[ProcessOutcome, bytes, float, int]:
        sink = Collector()
        started = time.monotonic()
        # The sleeper inherits stdout, so the pipe stays open after sh exits.
        proc = await JobProcess.start(make_spec(["sh", "-c", "sleep 1000 & echo $!"], tmp_path), sink)
        outcome = await proc.wait()
        return outcome, sink.data, time.monotonic() - started, proc.pgid

    outcome, data, elapsed, pgid = run(scenario())
    assert elapsed < 2.0
    assert (outcome.exit_code, outcome.reason, outcome.strays_killed) == (0, None, True)
    assert not alive(int(data.split()[0]))
    assert not group_alive(pgid)


def test_stray_ignoring_sigterm_with_closed_pipes_is_killed(run: Runner, tmp_path: Path) -> None:
    script = "(trap '' TERM; exec sleep 1000) >/dev/null 2>&1 & echo $!"

    async def scenario() -> tuple[ProcessOutcome, bytes, float, int]:
        sink = Collector()
        started = time.monotonic()
        proc = await JobProcess.start(make_spec(["sh", "-c", script], tmp_path), sink)
        outcome = await proc.wait()
        return outcome, sink.data, time.monotonic() - started, proc.pgid

    outcome, data, elapsed, pgid = run(scenario())
    assert elapsed < STRAY_GRACE_SECONDS + 1.5
    assert outcome.strays_killed and outcome.exit_code == 0
    assert not alive(int(data.split()[0]))
    assert not group_alive(pgid)


def test_process_that_left_the_group_cannot_hold_wait_forever(
    run: Runner, tmp_path: Path, reap_strays: list[int]
) -> None:
    # setsid puts the sleeper in a session of its own: out of the job's group, out of our reach,
    # yet holding the stdout pipe. wait() gives up on the pipe after PIPE_EOF_SECONDS.
    async def scenario() -> tuple[ProcessOutcome, float, int]:
        sink = Collector()
        started = time.monotonic()
        proc = await JobProcess.start(make_spec(["sh", "-c", "setsid sleep 1000 & echo $!"], tmp_path), sink)
        await sink.wait_for(b"\n")
        reap_strays.append(int(sink.data.split()[0]))
        outcome = await proc.wait()
        return outcome, time.monotonic() - started, proc.pgid

    outcome, elapsed, pgid = run(scenario())
    assert elapsed < PIPE_EOF_SECONDS + 1.5
    assert outcome.exit_code == 0
    assert not group_alive(pgid)


# --- memory bound --------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.slow
def test_one_gib_of_output_is_drained_in_bounded_memory(run: Runner, tmp_path: Path) -> None:
    size = 1 << 30
    counted = [0, 0]  # bytes, largest chunk

    def counting_sink(chunk: bytes) -> None:
        counted[0] += len(chunk)
        counted[1] = max(counted[1], len(chunk))

    rss_before, hwm_before = _status_kib("VmRSS"), _status_kib("VmHWM")
    spec = make_spec(["head", "-c", str(size), "/dev/zero"], tmp_path)

    async def scenario() -> ProcessOutcome:
        proc = await JobProcess.start(spec, counting_sink)
        return await proc.wait()

    outcome = run(scenario(), 120)
    rss_after, hwm_after = _status_kib("VmRSS"), _status_kib("VmHWM")
    assert outcome.exit_code == 0
    assert counted[0] == size
    assert counted[1] <= 65536
    assert (rss_after - rss_before) < 150 * 1024
    assert (hwm_after - hwm_before) < 150 * 1024


def test_start_time_is_read_before_the_leader_is_reaped(run: Runner, tmp_path: Path) -> None:
    """The leader's starttime is not read at spawn (right after exec the read waits on the new
    program's memory set-up) but on first use, at the latest as the exited leader is reaped: the
    value is this process's even when nobody asked while it ran."""

    async def scenario() -> tuple[int | None, int, int]:
        running = await JobProcess.start(make_spec(["/bin/sleep", "0.3"], tmp_path), Collector())
        seen = process_start_time(running.pid)
        assert running._start_time is None  # not read at spawn
        await running.wait()
        quick = await JobProcess.start(make_spec(["/bin/true"], tmp_path), Collector())
        await quick.wait()
        # After the reap a read of /proc would fail (0) or find another process.
        assert quick._start_time is not None
        return seen, running.start_time, quick.start_time

    seen, recorded, quick_recorded = run(scenario())
    assert seen is not None and recorded == seen
    assert quick_recorded > 0
    ticks = os.sysconf("SC_CLK_TCK")
    boot_age = time.clock_gettime(time.CLOCK_BOOTTIME) * ticks
    assert abs(boot_age - quick_recorded) < 10 * ticks  # started just now, in clock ticks after boot


# --- crash recovery helpers ----------------------------------------------------------------------


def test_start_time_and_group_alive_helpers() -> None:
    assert isinstance(process_start_time(os.getpid()), int)
    assert process_start_time(4_194_305) is None  # above the largest possible pid_max
    assert not group_alive(4_194_305)
    assert not group_alive(0)


def test_kill_process_group_refuses_other_start_time() -> None:
    proc = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    try:
        start = process_start_time(proc.pid)
        assert start is not None
        assert not kill_process_group(proc.pid, leader_pid=proc.pid, leader_start_time=start + 1)
        assert alive(proc.pid)
        assert kill_process_group(proc.pid, leader_pid=proc.pid, leader_start_time=start, grace=1.0)
        assert proc.wait(timeout=5) == -signal.SIGTERM
        assert not kill_process_group(proc.pid, leader_pid=proc.pid, leader_start_time=start)
    finally:
        proc.kill()
        proc.wait(timeout=5)


def test_kill_process_group_after_leader_is_gone() -> None:
    # Leader exits and is reaped; its background sleeper remains in session == pgid.
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 1000 & echo $!"], start_new_session=True, stdout=subprocess.PIPE
    )
    assert leader.stdout is not None
    start = process_start_time(leader.pid)
    sleeper = int(leader.stdout.readline())
    leader.stdout.close()
    leader.wait(timeout=5)
    try:
        assert start is not None and process_start_time(leader.pid) is None
        assert alive(sleeper)
        # A leader start time later than the members' cannot be ours.
        assert not kill_process_group(leader.pid, leader_pid=leader.pid, leader_start_time=start + 10**6)
        assert kill_process_group(leader.pid, leader_pid=leader.pid, leader_start_time=start, grace=1.0)
        assert not alive(sleeper)
        assert not group_alive(leader.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(sleeper, signal.SIGKILL)


def test_kill_process_group_refuses_group_outside_its_own_session() -> None:
    # A group in *our* session (no setsid): its session id differs from its pgid.
    leader = subprocess.Popen(["sh", "-c", "sleep 1000 & echo $!"], process_group=0, stdout=subprocess.PIPE)
    assert leader.stdout is not None
    start = process_start_time(leader.pid)
    sleeper = int(leader.stdout.readline())
    leader.stdout.close()
    leader.wait(timeout=5)
    try:
        assert start is not None
        assert not kill_process_group(leader.pid, leader_pid=leader.pid, leader_start_time=start)
        assert alive(sleeper)
    finally:
        os.kill(sleeper, signal.SIGKILL)


def test_the_stdout_tap_gets_standard_output_alone(run: Runner, tmp_path: Path) -> None:
    """A reader of codex's JSON lines taps stdout only: stderr lines landing between the pieces of
    a long stdout line (over a pipe's 64 KiB) must not split it."""
    code = (
        "import sys\n"
        "line = '{' + 'x' * 200000 + '}\\n'\n"
        "for i in range(0, len(line), 50000):\n"
        "    sys.stdout.write(line[i:i + 50000]); sys.stdout.flush()\n"
        "    sys.stderr.write('trace\\n'); sys.stderr.flush()\n"
    )
    both, tapped = Collector(), Collector()

    async def go() -> ProcessOutcome:
        proc = await JobProcess.start(make_spec([PY, "-c", code], tmp_path), both, stdout_tap=tapped)
        return await proc.wait()

    assert run(go()).exit_code == 0
    assert b"".join(tapped.chunks) == b"{" + b"x" * 200000 + b"}\n"
    assert b"".join(both.chunks).count(b"trace\n") == 5


def test_a_failing_log_write_does_not_keep_output_from_the_tap(run: Runner, tmp_path: Path) -> None:
    """The log sink and the tap ran in one `try`: a log write that failed (a full disk) kept that
    chunk from codex's event parser, which may be the one with `turn.failed`: the job then
    counted as a success."""
    import errno

    class FullDisk(Collector):
        def __call__(self, chunk: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    tapped = Collector()

    async def go() -> ProcessOutcome:
        code = 'print(\'{"type": "turn.failed"}\')'
        proc = await JobProcess.start(make_spec([PY, "-c", code], tmp_path), FullDisk(), stdout_tap=tapped)
        outcome = await proc.wait()
        assert proc.sink_errors >= 1
        return outcome

    assert run(go()).exit_code == 0
    assert b"".join(tapped.chunks) == b'{"type": "turn.failed"}\n'


def test_a_stop_during_the_clean_up_after_a_clean_exit_does_not_make_it_a_timeout(
    run: Runner, tmp_path: Path
) -> None:
    """The leader exits 0 by itself; its leftover child (ignoring SIGTERM) takes up to
    STRAY_GRACE_SECONDS to kill. A timeout or a shutdown that fires in that window stops nothing of
    the script's own: its outcome is its exit, not the reason given to `terminate()`."""

    async def scenario() -> ProcessOutcome:
        spec = make_spec(["/bin/sh", "-c", "(trap '' TERM; exec sleep 30) & exit 0"], tmp_path)
        proc = await JobProcess.start(spec, Collector())
        deadline = time.monotonic() + 5
        while proc.returncode is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await proc.terminate("timeout", 0.0)
        return await proc.wait()

    outcome = run(scenario())
    assert (outcome.exit_code, outcome.reason, outcome.signal) == (0, None, None)
    assert outcome.strays_killed
