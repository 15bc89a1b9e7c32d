"""Crash recovery time and scale-out throughput on PostgreSQL, with real `codex-runner` processes.

    .venv/bin/python bench/recovery.py [--pg-url postgresql://postgres@127.0.0.1:5432/postgres]
        [--repeat 3] [--jobs 200] [--instances 1,2,4] [--concurrency 4]

Each scenario gets a scratch database `cr_bench_<hex>` (dropped at the end) and a temp dir, and
runs instances with RUNNER_HEARTBEAT_SECONDS=1, RUNNER_STALE_AFTER_SECONDS=3 (tests/chaos/harness.py).

1. Watchdog path: instance A runs 4 jobs (sleep 60), B watches; SIGKILL A; time until every one of
   A's jobs is `failed` (heartbeat_stale). The bound is stale + half a heartbeat after A's last beat.
2. Restart path: A runs 4 jobs; SIGKILL A and start it again at once with the same RUNNER_ID; time
   until every job is `failed` (recovered_after_crash): process start-up + recovery.
3. Throughput: `--jobs` trivial jobs (the script exits at once) from 8 users queued first, then
   1, 2, 4 worker instances of `--concurrency` slots each; jobs/s from the first start to the
   last finish (database timestamps). Each job is a real process in a scratch workspace.

Prints tables; not a pass/fail test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from tests.chaos.harness import Cluster, job_pids, wait_for  # noqa: E402

#: Four jobs of one user on one instance: the per-user limit must not be what holds them back.
ROOMY = {"RUNNER_MAX_JOBS_PER_USER": "10"}


@contextmanager
def scratch_db(admin_url: str) -> Iterator[str]:
    name = f"cr_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _start_victim(c: Cluster, runner_id: str) -> tuple[object, list[str]]:
    a = c.start(runner_id, "worker", RUNNER_MAX_CONCURRENCY="4")
    ids = c.submit(4, sleep=60.0)
    wait_for(lambda: c.running_of(runner_id) == set(ids), 60, "the jobs to run")
    wait_for(lambda: all(r["pid"] for r in c.rows(ids).values()), 60, "the pids")
    return a, ids


def watchdog_path(admin_url: str) -> float:
    with (
        scratch_db(admin_url) as url,
        tempfile.TemporaryDirectory() as tmp,
        Cluster(Path(tmp), url, env=ROOMY) as c,
    ):
        c.start("bench-b", "worker", RUNNER_MAX_CONCURRENCY="1")
        blocker = c.submit(1, sleep=600.0, user="bob")
        wait_for(lambda: c.running_of("bench-b") == set(blocker), 60, "B's blocker")
        a, ids = _start_victim(c, "bench-a")
        c.sigkill(a)  # type: ignore[arg-type]
        t0 = time.monotonic()
        wait_for(lambda: c.all_done(ids), 60, "recovery", interval=0.01)
        return time.monotonic() - t0


def restart_path(admin_url: str) -> tuple[float, float]:
    with (
        scratch_db(admin_url) as url,
        tempfile.TemporaryDirectory() as tmp,
        Cluster(Path(tmp), url, env=ROOMY) as c,
    ):
        a, ids = _start_victim(c, "bench-a")
        c.sigkill(a)  # type: ignore[arg-type]
        t0 = time.monotonic()
        again = c.start("bench-a", "worker", wait=False, RUNNER_MAX_CONCURRENCY="4")
        c.wait_ready(again)
        registered = time.monotonic() - t0
        wait_for(lambda: c.all_done(ids), 60, "recovery", interval=0.01)
        total = time.monotonic() - t0
        assert not job_pids(ids), "leftover processes after recovery"
        return total, registered


def throughput(admin_url: str, instances: int, jobs: int, concurrency: int) -> tuple[float, float]:
    env = {
        "RUNNER_MAX_CONCURRENCY": str(concurrency),
        "RUNNER_MAX_JOBS_PER_USER": "100",
        "RUNNER_POLL_INTERVAL_SECONDS": "0.5",
    }
    with (
        scratch_db(admin_url) as url,
        tempfile.TemporaryDirectory() as tmp,
        Cluster(Path(tmp), url, env=env) as c,
    ):
        ids = [c.submit(1, user=f"user{i % 8}", sleep=0.0)[0] for i in range(jobs)]
        for n in range(instances):
            c.start(f"bench-{n}", "worker", wait=False)
        wait_for(lambda: c.all_done(ids), 900, "all jobs", interval=0.2)
        rows = c.rows(ids).values()
        assert all(r["status"] == "success" for r in rows)
        first = min(r["started_at"] for r in rows)
        last = max(r["finished_at"] for r in rows)
        span = (last - first).total_seconds()
        mean_run = statistics.mean((r["finished_at"] - r["started_at"]).total_seconds() for r in rows)
        return jobs / span, mean_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--instances", default="1,2,4")
    p.add_argument("--concurrency", type=int, default=4)
    a = p.parse_args()

    watch = [watchdog_path(a.pg_url) for _ in range(a.repeat)]
    restart = [restart_path(a.pg_url) for _ in range(a.repeat)]
    print("recovery after SIGKILL (heartbeat 1 s, stale 3 s), 4 running jobs, seconds:")
    print("| path | median | min | max |")
    print("|---|---|---|---|")
    print(
        f"| watchdog (another instance) | {statistics.median(watch):.2f} | {min(watch):.2f} | {max(watch):.2f} |"
    )
    totals = [t for t, _ in restart]
    starts = [s for _, s in restart]
    print(
        f"| restart, same RUNNER_ID | {statistics.median(totals):.2f} | {min(totals):.2f} | {max(totals):.2f} |"
    )
    print(f"| (of which process start-up until registered) | {statistics.median(starts):.2f} | | |")
    print()
    print(f"throughput, {a.jobs} trivial jobs, {a.concurrency} slots per instance:")
    print("| instances | jobs/s | mean job run (claim → finished) |")
    print("|---|---|---|")
    for n in (int(x) for x in a.instances.split(",")):
        rate, mean_run = throughput(a.pg_url, n, a.jobs, a.concurrency)
        print(f"| {n} | {rate:.1f} | {mean_run * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
