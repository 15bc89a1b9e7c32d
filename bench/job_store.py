"""CPU cost of a trivial job's database work, in-process: its claim and its terminal write, as the
launcher makes them during a drain (issue 3's drain target; see docs/performance.md, "Dispatch").

    .venv/bin/python bench/job_store.py [--backend sqlite|postgresql|both] [--jobs 2000]
        [--batch 8] [--rounds 5] [--statement]

Per round: `--jobs` queued jobs are created (not timed), then the timed loop does what a drain at
concurrency `--batch` does in the store: one claim of `--batch` jobs, then, batch after batch, one
`finish_many` of their terminal writes (the `OwnerWrite`s `JobRun` makes, stages and all) that
claims the next batch in the same transaction. Prints the CPU time of this process per job (the
database server's own CPU is not in it: on SQLite there is none) and the wall time, median of the
rounds. The drain itself is `bench/dispatch.py`; this isolates the part of its per-job cost that
is SQLAlchemy and the driver. `--statement` also times one terminal `UPDATE` through
`Connection.execute` and through `Prepared` (store/prepared.py), CPU per call. `--idle` instead
times what an idle runner asks of the store per job: a create, then the claim of that one job, each
its own transaction (wall time, median of 200; `bench/dispatch_idle.py` puts them in context).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _serve import database_url
from codex_runner.config import load_settings
from codex_runner.jobs import ErrorCode, Status
from codex_runner.runtime import Runtime
from codex_runner.store.admin import Principal
from codex_runner.store.engine import write_txn
from codex_runner.store.jobs import _TERMINAL_CAS, Cas, ClaimRequest, OwnerWrite
from codex_runner.store.prepared import Prepared
from codex_runner.store.records import initial_stages, iso, utcnow
from dispatch import PG_URL, scratch_runner_env


def terminal_write(job_id: str, lease: str, pid: int) -> OwnerWrite:
    """What `JobRun._terminal_write` makes for a job that succeeded within its first second."""
    now = iso(utcnow())
    stages = initial_stages()
    for stage in stages:
        stage.update(status="success", started_at=now, finished_at=now)
    values = {
        "exit_code": 0,
        "error_code": None,
        "error_message": None,
        "stages": stages,
        "result": None,
        "pid": pid,
        "pgid": pid,
        "proc_start_time": 123456,
    }
    canceled = Cas(
        (Status.CANCEL_REQUESTED,),
        Status.CANCELED,
        {**values, "error_code": ErrorCode.CANCELED, "error_message": "canceled"},
        "canceled",
    )
    return OwnerWrite(job_id, lease, (Cas((Status.RUNNING,), Status.SUCCESS, values, "success"), canceled))


def one_round(rt: Runtime, jobs: int, batch: int) -> tuple[float, float]:
    admin = Principal(user="root", role="admin")
    for _ in range(jobs):
        rt.create_job(admin, {"repo": "scratch", "script_key": "true", "args": {}})
    store = rt.jobs
    request = ClaimRequest("bench", batch, 1_000_000)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    claimed = store.claim("bench", slots=batch, max_jobs_per_user=1_000_000)
    done = 0
    pid = 1000
    while claimed:
        writes = []
        for job in claimed:
            pid += 1
            writes.append(terminal_write(job.id, job.lease_token, pid))
        held, claimed = store.finish_many(writes, request)
        if any(h != 0 for h in held):
            raise RuntimeError(f"a terminal write did not hold: {held}")
        done += len(writes)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if done != jobs:
        raise RuntimeError(f"finished {done} of {jobs} jobs")
    return cpu / jobs * 1e6, wall / jobs * 1e6


@contextmanager
def scratch_runtime(backend: str, args: argparse.Namespace) -> Iterator[Runtime]:
    """A runtime on a scratch data folder and database, both removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=f"cr-jobstore-{backend}-"))
    try:
        with database_url(backend, args.pg_url, root, "cr_bench_") as url:
            rt = Runtime.open(load_settings(scratch_runner_env(root, url, "bench"), cwd=root))
            try:
                yield rt
            finally:
                rt.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(backend: str, args: argparse.Namespace) -> None:
    with scratch_runtime(backend, args) as rt:
        one_round(rt, min(args.jobs, 200), args.batch)  # warm-up: statement caches, pool
        results = [one_round(rt, args.jobs, args.batch) for _ in range(args.rounds)]
    cpu = statistics.median(r[0] for r in results)
    wall = statistics.median(r[1] for r in results)
    spread = ", ".join(f"{r[0]:.0f}" for r in results)
    print(
        f"{backend}: claim + terminal write, batches of {args.batch}: "
        f"{cpu:.0f} µs CPU per job (rounds: {spread}), {wall:.0f} µs wall per job"
    )
    if args.statement:
        statement(backend, args)


def statement(backend: str, args: argparse.Namespace, n: int = 5000) -> None:
    """One prebuilt terminal `UPDATE` (that matches no row), `n` times inside one transaction:
    through `Connection.execute`, and through `Prepared` on the DBAPI cursor. CPU µs per call."""
    with scratch_runtime(backend, args) as rt:
        values = {
            "b_job": "no-such-job",
            "b_lease": "lease",
            "b_from1": "running",
            "b_from2": "running",
            "b_dst": "success",
            "b_now": utcnow(),
            "b_exit_code": 0,
            "b_error_code": None,
            "b_error_message": None,
            "b_stages": initial_stages(),
            "b_result": None,
            "b_pid": 1,
            "b_pgid": 1,
            "b_proc_start_time": 1,
        }
        prepared = Prepared(_TERMINAL_CAS, rt.engine.dialect)
        timings = {}
        with write_txn(rt.engine, op="bench.prepared") as conn:
            for name, call in (
                ("Connection.execute", lambda: conn.execute(_TERMINAL_CAS, values).rowcount),
                ("Prepared (DBAPI cursor)", lambda: prepared.execute(conn, values)),
            ):
                call()
                cpu0 = time.process_time()
                for _ in range(n):
                    call()
                timings[name] = (time.process_time() - cpu0) / n * 1e6
    print(f"{backend}: terminal UPDATE, " + ", ".join(f"{k} {v:.1f} µs CPU" for k, v in timings.items()))


def idle(backend: str, args: argparse.Namespace, n: int = 200) -> None:
    """What an idle runner asks of the store per job: one create, then the claim of that job
    (`JobStore.claim`, its own transaction), `n` times; the job is then marked done so that the
    next claim finds the user free. Median wall time of each call, ms."""
    with scratch_runtime(backend, args) as rt:
        admin = Principal(user="root", role="admin")
        body = {"repo": "scratch", "script_key": "true", "args": {}}
        creates: list[float] = []
        claims: list[float] = []
        for i in range(n + 20):  # the first 20 warm the pool and the statement caches
            t0 = time.perf_counter()
            job, _ = rt.create_job(admin, body)
            t1 = time.perf_counter()
            claimed = rt.jobs.claim("bench", slots=1, max_jobs_per_user=1)
            t2 = time.perf_counter()
            if [c.id for c in claimed] != [job["id"]]:
                raise RuntimeError("the claim did not take the job just created")
            rt.jobs.transition(job["id"], [Status.RUNNING], Status.SUCCESS, event_type="job_succeeded")
            if i >= 20:
                creates.append((t1 - t0) * 1000)
                claims.append((t2 - t1) * 1000)
    print(
        f"{backend}: idle, one job at a time: create {statistics.median(creates):.2f} ms, "
        f"claim {statistics.median(claims):.2f} ms (medians of {n})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--pg-url", default=PG_URL)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--statement",
        action="store_true",
        help="also time one statement: Connection.execute against Prepared",
    )
    ap.add_argument(
        "--idle",
        action="store_true",
        help="instead: an idle runner's create and claim, one job at a time (wall ms per call)",
    )
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    for backend in ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]:
        if args.idle:
            idle(backend, args)
        else:
            run(backend, args)


if __name__ == "__main__":
    main()
