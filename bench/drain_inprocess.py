"""Where a trivial job's CPU goes: the launcher drained in-process (no HTTP server), and the parts
of a job timed one by one (issue 3's drain target; see docs/performance.md, "Dispatch").

    .venv/bin/python bench/drain_inprocess.py [--jobs 3000] [--concurrency 8]
        [--inline none job commit all] [--linger 0 0.001 0.002] [--parts]

Drain: a scratch data dir (SQLite, under $TMPDIR), `--jobs` `/bin/true` jobs created with nothing
claiming, then `Launcher` started on uvloop with RUNNER_MAX_CONCURRENCY = `--concurrency`, until
all are terminal. Prints jobs/s and this process's CPU per job (every thread; the children's own
CPU is not in it), split between the event loop's thread and the worker threads (the group
commit's transaction, the launcher's other trips, the bench's own progress poll), and the group
commit's transactions: how many, and their CPU per job (the claim and terminal writes, timed in
their thread); and the CPU of the jobs' own processes (`/bin/true`'s start-up and exit), which
share the cores: the drain cannot pass the rate at which the two bills together fill them all. `--inline` is an experiment, not a setting: it runs the named worker-thread trips
on the event loop instead (`job`: JobRun's own trips; `commit`: the group commit's; `all`: every
`asyncio.to_thread`), to show what handing work to a thread and back costs. `--linger` is one too:
the group commit's wait for the endings of jobs still running, in seconds (0 turns it off). One
drain per value (per pair of values), in the order given.

`--parts`: each part of a trivial job on its own, in one thread: spawn and wait through
`JobProcess` (and a bare `subprocess.Popen` + `wait` beside it), one `asyncio.to_thread` round
trip, a run-manifest write, the log file with its four runner lines, and the service log line;
and the wall time of the leader's /proc/<pid>/stat read right after the spawn and after its exit.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
import uvloop

from codex_runner.config import Settings, load_settings
from codex_runner.execution.manifest import ManifestWriter
from codex_runner.execution.process import JobProcess, ProcessSpec, build_env, process_start_time
from codex_runner.execution.sandbox import abi_version, job_access
from codex_runner.launcher import Launcher
from codex_runner.logs.writer import LogWriter
from codex_runner.ops.logging import configure_logging
from codex_runner.runtime import Runtime
from codex_runner.store.admin import Principal
from codex_runner.store.records import initial_stages, iso, utcnow
from codex_runner.store.schema import jobs
from dispatch import remove_later, remove_leftovers, scratch_runner_env
from spawn_baseline import children_cpu

_TO_THREAD = asyncio.to_thread


#: RUNNER_JOB_ISOLATION of the drained runner (`--isolation`): its Landlock confinement of each
#: spawn is part of a job's cost by default.
_ISOLATION = "auto"


def _settings(root: Path, concurrency: int) -> Settings:
    url = f"sqlite:///{root / 'data' / 'runner.db'}"
    extra = {
        "RUNNER_MAX_JOBS_PER_USER": "100000",
        "RUNNER_MAX_CONCURRENCY": str(concurrency),
        "RUNNER_JOB_ISOLATION": _ISOLATION,
    }
    return load_settings(scratch_runner_env(root, url, "bench-inprocess", **extra), cwd=root)


def _inline(which: str) -> None:
    """Replaces `asyncio.to_thread` so that the chosen trips run on the calling (loop) thread."""
    owners = {"job": {"JobRun"}, "commit": {"GroupCommitter"}}.get(which, set())

    async def to_thread(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if which == "all" or type(getattr(fn, "__self__", None)).__name__ in owners:
            return fn(*args, **kwargs)
        return await _TO_THREAD(fn, *args, **kwargs)

    asyncio.to_thread = _TO_THREAD if which == "none" else to_thread  # type: ignore[assignment]


@dataclass
class Drained:
    rate: float  # jobs/s
    cpu_ms: float  # this process's CPU per job, every thread
    loop_ms: float  # the part of it on the event loop's thread
    batches: int = 0  # the group commit's transactions
    store_ms: float = 0.0  # their CPU per job (`GroupCommitter._write`: the claim and terminal writes)
    programs_ms: float = 0.0  # the jobs' own processes' CPU per job (`/bin/true` itself)


def drain(count: int, concurrency: int, inline: str, linger: float | None = None) -> Drained:
    root = Path(tempfile.mkdtemp(prefix="cr-drain-"))
    try:
        settings = _settings(root, concurrency)
        configure_logging(settings, stream=open(os.devnull, "w"))  # noqa: SIM115 (for the run)
        rt = Runtime.open(settings)
        admin = Principal(user="root", role="admin")
        for _ in range(count):
            rt.create_job(admin, {"repo": "scratch", "script_key": "true", "args": {}})

        def left() -> int:
            with rt.engine.connect() as conn:
                active = jobs.c.status.in_(["queued", "running", "cancel_requested"])
                return int(conn.execute(sa.select(sa.func.count()).where(active)).scalar_one())

        async def run() -> Drained:
            _inline(inline)
            try:
                launcher = Launcher(rt)
                if linger is not None:  # an experiment: the group commit's wait for running jobs
                    launcher._finisher.linger = linger
                store = _time_store(launcher)
                programs0 = children_cpu()
                cpu0, wall0, loop0 = time.process_time(), time.perf_counter(), time.thread_time()
                await launcher.start()
                while await _TO_THREAD(left):
                    await asyncio.sleep(0.05)
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                loop_cpu = time.thread_time() - loop0  # this coroutine runs on the loop's thread
                await launcher.stop()
                programs = children_cpu() - programs0
                ms = 1000 / count
                return Drained(count / wall, cpu * ms, loop_cpu * ms, store[0], store[1] * ms, programs * ms)
            finally:
                _inline("none")

        try:
            return uvloop.run(run())
        finally:
            rt.close()
    finally:
        remove_later(root)


def _time_store(launcher: Launcher) -> list[float]:
    """[transactions, their CPU seconds], kept up to date: wraps the launcher's group commit's
    `_write` (its transaction, in its worker thread) with a thread CPU clock."""
    totals = [0.0, 0.0]
    committer = launcher._finisher
    write = committer._write

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time()
        try:
            return write(*args, **kwargs)
        finally:
            totals[0] += 1
            totals[1] += time.thread_time() - t0

    committer._write = timed  # type: ignore[method-assign]
    return totals


def _time(n: int, fn: Callable[[], object]) -> float:
    fn()
    cpu0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - cpu0) / n * 1e6


def _stat_read_wall(root: Path, env: dict[str, str], n: int = 1000) -> tuple[float, float]:
    """Wall time of the leader's /proc/<pid>/stat read (`JobProcess.start_time`) right after the
    spawn, and once the leader exited but is not yet reaped: mean µs of `n` each (right after the
    spawn the read is quick or waits on the exec, so the median hides what it costs)."""
    fresh: list[float] = []
    exited: list[float] = []
    for i in range(2 * n):
        proc = subprocess.Popen(
            ["/bin/true"], cwd=root, env=env, stdin=subprocess.DEVNULL, start_new_session=True
        )
        if i % 2:
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        t0 = time.perf_counter()
        process_start_time(proc.pid)
        (exited if i % 2 else fresh).append((time.perf_counter() - t0) * 1e6)
        proc.wait()
    return statistics.fmean(fresh), statistics.fmean(exited)


def parts() -> None:
    root = Path(tempfile.mkdtemp(prefix="cr-parts-"))
    try:
        settings = _settings(root, 8)
        configure_logging(settings, stream=open(os.devnull, "w"))  # noqa: SIM115 (for the run)
        env = build_env([], {"RUNNER_JOB_ID": "bench"})

        workspace = settings.workspace_dir / "bench"
        workspace.mkdir(parents=True, exist_ok=True)
        confined = ProcessSpec(
            argv=["/bin/true"],
            cwd=workspace,
            env=env,
            access=job_access(settings, workspace),
            isolation="required",
        )

        async def spawn() -> tuple[float, float, float]:
            spec = ProcessSpec(argv=["/bin/true"], cwd=root, env=env)
            cpu0 = time.process_time()
            for _ in range(1000):
                proc = await JobProcess.start(spec, lambda _: None)
                await proc.wait()
            confined0 = time.process_time()
            for _ in range(1000 if abi_version() else 0):
                proc = await JobProcess.start(confined, lambda _: None)
                await proc.wait()
            trip0 = time.process_time()
            for _ in range(5000):
                await asyncio.to_thread(lambda: None)
            return (
                (confined0 - cpu0) / 1000 * 1e6,
                (trip0 - confined0) / 1000 * 1e6,
                (time.process_time() - trip0) / 5000 * 1e6,
            )

        spawn_us, confined_us, trip_us = uvloop.run(spawn())
        popen_us = _time(
            1000,
            lambda: subprocess.Popen(
                ["/bin/true"], cwd=root, env=env, stdin=subprocess.DEVNULL, start_new_session=True
            ).wait(),
        )
        doc = {
            "job_id": "x" * 36,
            "status": "running",
            "stages": initial_stages(),
            "updated_at": iso(utcnow()),
        }
        manifest = ManifestWriter(root / "runs" / "one")
        names = itertools.count()

        def log_file() -> None:
            writer = LogWriter(root / "logs" / f"{next(names)}.log", max_bytes=1 << 30, known_secrets=[])
            for line in ("job started", "workspace ready", "script exited with code 0", "job ending"):
                writer.runner_line(line)
            writer.close()

        service = structlog.get_logger("codex_runner.job")
        stat_fresh, stat_exited = _stat_read_wall(root, env)
        rows = [
            ("spawn + wait, JobProcess", spawn_us),
            ("spawn + wait, JobProcess confined by Landlock (0: no Landlock)", confined_us),
            ("spawn + wait, bare Popen", popen_us),
            ("asyncio.to_thread round trip", trip_us),
            (
                "manifest write (atomic, no fsync)",
                _time(3000, lambda: manifest.update(doc, force=True, durable=False)),
            ),
            ("log file + 4 runner lines", _time(3000, log_file)),
            (
                "service log line",
                _time(3000, lambda: service.info("job_finished", job_id="x" * 36, status_to="success")),
            ),
        ]
        for name, us in rows:
            print(f"{name}: {us:.0f} µs CPU")
        print(f"/proc/<pid>/stat read right after the spawn: {stat_fresh:.0f} µs wall (mean)")
        print(f"/proc/<pid>/stat read once the leader exited (unreaped): {stat_exited:.0f} µs wall (mean)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--inline", nargs="+", choices=["none", "job", "commit", "all"], default=["none"])
    ap.add_argument(
        "--linger",
        type=float,
        nargs="+",
        default=[None],
        help="the group commit's linger in seconds (default: the shipped one, finisher.LINGER_SECONDS)",
    )
    ap.add_argument("--parts", action="store_true", help="time the parts of a job instead of draining")
    ap.add_argument(
        "--isolation", choices=["auto", "off"], default="auto", help="RUNNER_JOB_ISOLATION of the runner"
    )
    args = ap.parse_args()
    print(
        f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs); TMPDIR={tempfile.gettempdir()}"
    )
    global _ISOLATION
    _ISOLATION = args.isolation
    if args.parts:
        parts()
        return
    try:
        for which in args.inline:
            for linger in args.linger:
                got = drain(args.jobs, args.concurrency, which, linger)
                shown = "" if linger is None else f", linger={linger * 1000:g} ms"
                print(
                    f"inline={which}{shown}: {got.rate:,.0f} jobs/s, {got.cpu_ms:.2f} ms CPU per job"
                    f" ({got.loop_ms:.2f} on the event loop's thread, {got.cpu_ms - got.loop_ms:.2f}"
                    f" in worker threads) (c={args.concurrency}); group commit:"
                    f" {got.batches:,.0f} transactions of {args.jobs / max(got.batches, 1):.1f} jobs,"
                    f" {got.store_ms:.2f} ms CPU per job in them"
                )
                cores = os.cpu_count() or 1
                per_job = got.cpu_ms + got.programs_ms
                print(
                    f"  CPU per job {got.cpu_ms:.2f} here + {got.programs_ms:.2f} in the jobs' processes"
                    f" = {per_job:.2f} ms: {cores} cores {got.rate * per_job / 10 / cores:.0f}% busy,"
                    f" all full at {cores * 1000 / per_job:,.0f} jobs/s"
                )
    finally:
        remove_leftovers()


if __name__ == "__main__":
    main()
