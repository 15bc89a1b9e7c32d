"""Where an idle runner's dispatch time goes, step by step, in-process (issue 3's dispatch target;
see docs/performance.md, "Dispatch").

    .venv/bin/python bench/dispatch_idle.py [--backend sqlite|postgresql|both] [--samples 150]

Per backend: a scratch data dir (under $TMPDIR) and database (`bench/job_store.py`'s `scratch_runtime`),
the real `Launcher` on uvloop with nothing running, and `--samples` jobs created one at a time
through `Runtime.create_job`, each once the one before has ended, 30 ms apart. The bench wraps a
few of the runner's own functions with timers (its copy of them only; nothing in the package
changes) and prints, per job, the median of each step in milliseconds:

    create         Runtime.create_job: the create transaction, from call to commit
    wake           create's commit -> the launcher's claim starts (the in-process wake-up)
    claim          JobStore.claim: the claim transaction, from call to commit
    to task        claim's commit -> the job's task runs (the thread trip back, the task start)
    set-up         the task's start -> the spawn begins (a scratch job's folder; before
                   2026-12-02 also its log file and manifest); its parts below, timed on their own
    spawn          JobProcess.start (pipes, vfork + exec of /bin/true)

`bench/dispatch.py` measures the same path end to end through HTTP, with the child's clock; this
shows which part of it grows with the database's round trips or the file system.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvloop

from codex_runner.execution import job as job_module
from codex_runner.execution.process import JobProcess
from codex_runner.launcher import Launcher
from codex_runner.logs.writer import LogWriter
from codex_runner.ops.logging import configure_logging
from codex_runner.runtime import Runtime
from codex_runner.store.admin import Principal
from codex_runner.store.jobs import JobStore
from dispatch import PG_URL
from job_store import scratch_runtime

STEPS = ("create", "wake", "claim", "to task", "set-up", "spawn")
MARKS = ("create_in", "created", "claim_in", "claimed", "task", "spawn_in", "spawned")


class Recorder:
    """Per job: the time each mark was passed; per part of the set-up: how long each call took."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, float]] = {}
        self.parts: dict[str, list[float]] = {}
        self.current: str | None = None  # the job whose task runs (one at a time here)

    def mark(self, job_id: str, name: str, at: float | None = None) -> None:
        self.jobs.setdefault(job_id, {})[name] = time.perf_counter() if at is None else at

    def steps(self, skip: int) -> dict[str, float]:
        complete = [marks for marks in list(self.jobs.values())[skip:] if len(marks) == len(MARKS)]
        if not complete:
            raise RuntimeError("no job passed every mark")
        return {
            step: statistics.median((m[b] - m[a]) * 1000 for m in complete)
            for step, a, b in zip(STEPS, MARKS[:-1], MARKS[1:], strict=True)
        }


@contextmanager
def instrumented(rec: Recorder) -> Iterator[None]:
    """Wraps the runner's functions on the dispatch path with timers; restores them afterwards."""
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = owner.__dict__[name]
        saved.append((owner, name, original))
        setattr(owner, name, make(original))

    def create(original: Any) -> Any:
        def wrapper(self: Runtime, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            job, dedup = original(self, *args, **kwargs)
            rec.mark(job["id"], "create_in", start)
            rec.mark(job["id"], "created")
            return job, dedup

        return wrapper

    def claim(original: Any) -> Any:
        def wrapper(self: JobStore, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            claimed = original(self, *args, **kwargs)
            for job in claimed:
                rec.mark(job.id, "claim_in", start)
                rec.mark(job.id, "claimed")
            return claimed

        return wrapper

    def run(original: Any) -> Any:
        async def wrapper(self: job_module.JobRun) -> None:
            rec.current = self.job_id
            rec.mark(self.job_id, "task")
            await original(self)

        return wrapper

    def start(original: Any) -> Any:
        async def wrapper(cls: type[JobProcess], *args: Any, **kwargs: Any) -> JobProcess:
            assert rec.current is not None
            rec.mark(rec.current, "spawn_in")
            proc = await original.__func__(cls, *args, **kwargs)
            rec.mark(rec.current, "spawned")
            return proc

        return classmethod(wrapper)

    def timed(key: str) -> Callable[[Any], Any]:
        """Times the calls made during a job's set-up (before its spawn), not later ones."""

        def make(original: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    if rec.current is not None and "spawn_in" not in rec.jobs[rec.current]:
                        rec.parts.setdefault(key, []).append((time.perf_counter() - start) * 1000)

            return wrapper

        return make

    patch(Runtime, "create_job", create)
    patch(JobStore, "claim", claim)
    patch(job_module.JobRun, "run", run)
    patch(JobProcess, "start", start)
    patch(LogWriter, "__init__", timed("log file (LogWriter)"))
    patch(job_module.JobRun, "_write_manifest", timed("manifest write"))
    patch(job_module, "prepare_workspace", timed("workspace folder (prepare_workspace)"))
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def measure(backend: str, samples: int) -> Recorder:
    rec = Recorder()
    with scratch_runtime(backend, argparse.Namespace(pg_url=PG_URL)) as rt:
        configure_logging(rt.settings, stream=open(os.devnull, "w"))  # noqa: SIM115 (for the run)
        admin = Principal(user="root", role="admin")
        body = {"repo": "scratch", "script_key": "true", "args": {}}

        async def run() -> None:
            launcher = Launcher(rt)
            await launcher.start()
            try:
                for _ in range(samples):
                    await asyncio.sleep(0.03)
                    await asyncio.to_thread(rt.create_job, admin, body)
                    deadline = time.monotonic() + 10
                    while not launcher.active and time.monotonic() < deadline:
                        await asyncio.sleep(0.001)  # claimed (a slow claim is not lost)
                    while launcher.active and time.monotonic() < deadline:
                        await asyncio.sleep(0.002)
                    if launcher.active:
                        raise RuntimeError("a job did not end within 10 s")
            finally:
                await launcher.stop()

        with instrumented(rec):
            uvloop.run(run())
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--samples", type=int, default=150)
    args = ap.parse_args()
    print(
        f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs); TMPDIR={tempfile.gettempdir()}"
    )
    skip = min(20, args.samples // 5)  # warm-up: pools, statement caches, imports
    for backend in ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]:
        rec = measure(backend, args.samples)
        steps = rec.steps(skip)
        total = sum(steps.values())
        print(f"\n{backend}: create -> spawned, median of each step (ms), total {total:.2f}")
        for step, ms in steps.items():
            print(f"  {step:<8} {ms:6.2f}")
        for part, values in rec.parts.items():
            print(f"    {part}: median {statistics.median(values[skip:]):.2f} ms")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
