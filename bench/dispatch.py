"""Dispatch latency, drain throughput and cancel latency of the real runner (issue 3), on SQLite
and PostgreSQL in one run.

    .venv/bin/python bench/dispatch.py [--backend sqlite|postgresql|both] [--samples 200]
        [--jobs 2000] [--concurrency 2 8] [--cancels 100]

For each backend: a scratch data dir (and on PostgreSQL a database `cr_bench_<hex>` on `--pg-url`'s
server, dropped at the end; the scratch folders are removed when the whole run ends, see
`remove_later`), a runner.toml with one `scratch` repo and three scripts, and the real
`codex-runner serve` (API + launcher in one process, as deployed) in a subprocess. Then:

(a) dispatch: on an idle runner (the previous job terminal, 20 ms of quiet), the client takes
    `time.time_ns()` and POSTs a job whose script is `/bin/date +%s%N`; its output — the child's
    first act, the realtime clock read right after exec — lands in the job log. Latency = child
    clock - client clock (same host, same clock). `--samples` jobs; also split at the job's
    `created_at` and `started_at` (the claim) to show where the time goes.
(b) drain: the server is stopped; `--jobs` `/bin/true` jobs are created straight through the
    runtime (RUNNER_ENABLED=false has the same effect: nothing claims them); the server starts
    again with RUNNER_MAX_CONCURRENCY=c and the bench polls the database until all are terminal.
    Throughput = jobs / (last `finished_at` - first `started_at`), so the server's start-up is
    not counted; the server's CPU seconds per job (and their system part) are reported too, and
    the CPU of the jobs' processes themselves, which share the cores (`cpu_budget`). Beside it,
    `bench/spawn_baseline.py` spawns the same processes from plain Python threads at the same
    concurrency, right before, on the same loaded machine.
(c) cancel: a job runs `/bin/sleep 600` (exits on SIGTERM); once its pgid is recorded and the
    process lives, the client takes the time, POSTs the cancel and polls /proc until the group has
    no live (non-zombie) process. `--cancels` jobs, one at a time.

`BENCH_SERVE_CMD` replaces `codex-runner serve` (same environment), for experiments such as another
event loop. Prints one markdown table per run (the rows of docs/performance.md's "Dispatch" section) and the
machine's load average, which matters: on a shared 2-core box other work steals the CPU.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from _serve import children_cpu, cpu_split, database_url, pct, serve_process
from codex_runner.config import load_settings
from codex_runner.execution.manifest import folder_mount
from codex_runner.execution.process import group_alive
from codex_runner.runtime import Runtime
from codex_runner.store.admin import Principal
from codex_runner.store.engine import create_store_engine
from codex_runner.store.schema import jobs
from spawn_baseline import children_cpu as children_cpu_self
from spawn_baseline import run_threads

PG_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TERMINAL = ("success", "failed", "canceled", "timeout")

RUNNER_TOML = """
[runner]
max_queue_size = 10000000
max_queued_per_user = 10000000

[repos.scratch]
source = "{repo}"
workspace = "scratch"

[scripts.stamp]
command = ["/bin/date", "+%s%N"]
timeout_seconds = 60

[scripts.true]
command = ["/bin/true"]
timeout_seconds = 60

[scripts.sleep]
command = ["/bin/sleep", "600"]
timeout_seconds = 3600
"""


def scratch_runner_env(root: Path, url: str, runner_id: str, **extra: str) -> dict[str, str]:
    """Makes `root/repo` and `root/runner.toml` (`RUNNER_TOML`) and returns the runner's environment
    for them, with `extra` settings (`RUNNER_*` names) on top: the set-up of every bench of the job
    path."""
    (root / "repo").mkdir()
    (root / "runner.toml").write_text(textwrap.dedent(RUNNER_TOML.format(repo=root / "repo")))
    return {
        "RUNNER_CONFIG": str(root / "runner.toml"),
        "RUNNER_DATA_DIR": str(root / "data"),
        "RUNNER_DATABASE_URL": url,
        "RUNNER_ALLOWED_REPO_PATHS": str(root / "repo"),
        "RUNNER_ID": runner_id,
        "RUNNER_LOG_FORMAT": "json",
        **extra,
    }


@dataclass
class Env:
    backend: str
    root: Path
    env: dict[str, str]
    url: str
    token: str = ""


@dataclass
class Result:
    backend: str
    dispatch_ms: list[float] = field(default_factory=list)
    to_created_ms: list[float] = field(default_factory=list)
    to_claim_ms: list[float] = field(default_factory=list)
    to_exec_ms: list[float] = field(default_factory=list)
    drain: dict[int, tuple[float, float, float]] = field(
        default_factory=dict
    )  # c -> (jobs/s, cpu ms/job, raw/s)
    drain_sys: dict[int, float] = field(default_factory=dict)  # c -> system CPU ms/job
    # c -> the jobs' own processes' CPU ms/job (reaped by the server), and the raw spawn's
    # (this process's CPU, its programs' CPU) per process
    drain_children: dict[int, float] = field(default_factory=dict)
    raw_cpu: dict[int, tuple[float, float]] = field(default_factory=dict)
    cancel_ms: list[float] = field(default_factory=list)
    cancel_status_ms: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)


# -- set-up -----------------------------------------------------------------------------------


#: Scratch folders of this run, removed when it ends (`remove_later`).
_LEFTOVERS: list[Path] = []


def remove_later(path: Path) -> None:
    """Removes `path` when the bench ends rather than now: on ext4 without a journal (this
    project's VM) every new file scans past the inodes freed in the last minutes, so deleting
    thousands of files (a drain's data folder, the raw spawn's folders) right before a drain
    slowed that drain (docs/performance.md, "Dispatch")."""
    _LEFTOVERS.append(path)


def remove_leftovers() -> None:
    while _LEFTOVERS:
        shutil.rmtree(_LEFTOVERS.pop(), ignore_errors=True)


@contextmanager
def scratch(backend: str, pg_url: str) -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix=f"cr-dispatch-{backend}-"))
    try:
        with database_url(backend, pg_url, root, "cr_bench_") as url:
            env = scratch_runner_env(
                root, url, f"bench-{backend}", RUNNER_MAX_JOBS_PER_USER="1000", RUNNER_KILL_GRACE_SECONDS="5"
            )
            rt = Runtime.open(load_settings(env, cwd=root))  # migrates, registers the repo
            try:
                token, _ = rt.tokens.create("root", "admin", "bench")
            finally:
                rt.close()
            yield Env(backend, root, env, url, token)
    finally:
        remove_later(root)


@contextmanager
def server(env: Env, **extra: str) -> Iterator[tuple[str, int]]:
    """`codex-runner serve` in its own process; yields (base URL, pid)."""
    # BENCH_SERVE_CMD: an experiment, another way to run the same server.
    cmd = shlex.split(os.environ["BENCH_SERVE_CMD"]) if os.environ.get("BENCH_SERVE_CMD") else None
    with serve_process(env.root, {**env.env, **extra}, cmd=cmd, stop_timeout=60) as served:
        yield served


def _ts(value: Any) -> float:
    """A stored timestamp (naive UTC datetime, or ISO text on SQLite) as epoch seconds."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


def wait_terminal(client: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/api/runner/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.005)
    raise RuntimeError(f"job {job_id} not terminal after {timeout} s")


# -- (a) dispatch -----------------------------------------------------------------------------


def bench_dispatch(env: Env, res: Result, samples: int) -> None:
    engine = create_store_engine(env.url, pool_size=1)
    log_dir = env.root / "data" / "logs"
    with server(env) as (url, _pid), httpx.Client(base_url=url, headers=_auth(env), timeout=30) as client:
        body = {"repo": "scratch", "script_key": "stamp", "args": {}}
        for i in range(samples + 5):
            time.sleep(0.02)  # idle: nothing running, nothing queued
            t0 = time.time_ns()
            r = client.post("/api/runner/jobs", json=body)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            job = wait_terminal(client, job_id)
            assert job["status"] == "success", job
            stamp = next(
                int(line) for line in (log_dir / f"{job_id}.log").read_text().splitlines() if line.isdigit()
            )
            if i < 5:
                continue  # warm-up: first connections, first imports
            with engine.connect() as conn:
                row = conn.execute(
                    sa.select(jobs.c.created_at, jobs.c.started_at).where(jobs.c.id == job_id)
                ).one()
            created, started = _ts(row.created_at) * 1e9, _ts(row.started_at) * 1e9
            res.dispatch_ms.append((stamp - t0) / 1e6)
            res.to_created_ms.append((created - t0) / 1e6)
            res.to_claim_ms.append((started - created) / 1e6)
            res.to_exec_ms.append((stamp - started) / 1e6)
    engine.dispose()


def _auth(env: Env) -> dict[str, str]:
    return {"Authorization": f"Bearer {env.token}"}


# -- (b) drain --------------------------------------------------------------------------------


def bench_drain(env: Env, res: Result, count: int, concurrency: int) -> None:
    rt = Runtime.open(load_settings(env.env, cwd=env.root))
    admin = Principal(user="root", role="admin")
    ids = [
        rt.create_job(admin, {"repo": "scratch", "script_key": "true", "args": {}})[0]["id"]
        for _ in range(count)
    ]
    rt.close()
    engine = create_store_engine(env.url, pool_size=1)
    raw_root = Path(tempfile.mkdtemp(prefix="cr-spawn-"))
    try:
        cpu0, programs0 = time.process_time(), children_cpu_self()
        raw = run_threads("/bin/true", count, concurrency, raw_root)
        raw_cpu = (time.process_time() - cpu0, children_cpu_self() - programs0)
    finally:
        remove_later(raw_root)
    res.load.append(os.getloadavg()[0])
    with server(env, RUNNER_MAX_CONCURRENCY=str(concurrency)) as (_url, pid):
        user0, sys0 = cpu_split(pid)
        reaped0 = children_cpu(pid)
        ids_set = set(ids)
        while True:
            with engine.connect() as conn:
                left = conn.execute(
                    sa.select(sa.func.count()).where(jobs.c.id.in_(ids_set), jobs.c.status.not_in(TERMINAL))
                ).scalar_one()
            if left == 0:
                break
            time.sleep(0.2)
        user1, sys1 = cpu_split(pid)
        cpu, system = user1 + sys1 - user0 - sys0, sys1 - sys0
        reaped = children_cpu(pid) - reaped0
        with engine.connect() as conn:
            first, last, ok = conn.execute(
                sa.select(
                    sa.func.min(jobs.c.started_at),
                    sa.func.max(jobs.c.finished_at),
                    sa.func.count().filter(jobs.c.status == "success"),
                ).where(jobs.c.id.in_(ids_set))
            ).one()
    engine.dispose()
    if ok != count:
        raise RuntimeError(
            f"drain: {count - ok} of {count} jobs did not succeed; see {env.root / 'server.log'}"
        )
    seconds = _ts(last) - _ts(first)
    res.drain[concurrency] = (count / seconds, cpu / count * 1000, raw)
    res.drain_sys[concurrency] = system / count * 1000
    res.drain_children[concurrency] = reaped / count * 1000
    res.raw_cpu[concurrency] = (raw_cpu[0] / count * 1000, raw_cpu[1] / count * 1000)


# -- (c) cancel -------------------------------------------------------------------------------


def bench_cancel(env: Env, res: Result, cancels: int) -> None:
    engine = create_store_engine(env.url, pool_size=1)
    body = {"repo": "scratch", "script_key": "sleep", "args": {}}
    with server(env) as (url, _pid), httpx.Client(base_url=url, headers=_auth(env), timeout=30) as client:
        for i in range(cancels + 3):
            r = client.post("/api/runner/jobs", json=body)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            pgid = None
            deadline = time.monotonic() + 30
            while pgid is None or not group_alive(pgid):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"job {job_id} did not start")
                time.sleep(0.005)
                with engine.connect() as conn:
                    pgid = conn.execute(sa.select(jobs.c.pgid).where(jobs.c.id == job_id)).scalar_one()
            time.sleep(0.05)  # the job settles (its post-spawn write done): a steady running job
            t0 = time.perf_counter()
            r = client.post(f"/api/runner/jobs/{job_id}/cancel")
            assert r.status_code == 202, r.text
            while group_alive(pgid):
                time.sleep(0.0005)
            t1 = time.perf_counter()
            job = wait_terminal(client, job_id)
            t2 = time.perf_counter()
            assert job["status"] == "canceled", job
            if i >= 3:
                res.cancel_ms.append((t1 - t0) * 1000)
                res.cancel_status_ms.append((t2 - t0) * 1000)
    engine.dispose()


# -- report -----------------------------------------------------------------------------------


def report(results: list[Result]) -> None:
    def p(values: list[float]) -> str:
        return f"{pct(values, 50):.1f} / {pct(values, 99):.1f}"

    concs = sorted({c for r in results for c in r.drain})
    print(
        "\n| backend | dispatch p50 / p99 ms | " + " | ".join(f"drain c={c} (raw spawn)" for c in concs),
        end="",
    )
    print(" | cancel p50 / p99 ms |")
    print("|---|---|" + "---|" * len(concs) + "---|")
    for r in results:
        cells = [r.backend, p(r.dispatch_ms) if r.dispatch_ms else "-"]
        for c in concs:
            if c in r.drain:
                rate, _cpu, raw = r.drain[c]
                cells.append(f"{rate:,.0f}/s ({raw:,.0f}/s)")
            else:
                cells.append("-")
        cells.append(p(r.cancel_ms) if r.cancel_ms else "-")
        print("| " + " | ".join(cells) + " |")
    print()
    for r in results:
        if r.dispatch_ms:
            print(
                f"{r.backend}: dispatch split p50 — POST→created {pct(r.to_created_ms, 50):.1f} ms, "
                f"created→claimed {pct(r.to_claim_ms, 50):.1f} ms, claimed→exec {pct(r.to_exec_ms, 50):.1f} ms; "
                f"mean {statistics.fmean(r.dispatch_ms):.1f} ms, max {max(r.dispatch_ms):.1f} ms"
            )
        for c, (rate, cpu, raw) in sorted(r.drain.items()):
            print(
                f"{r.backend}: drain c={c}: {rate:,.0f} jobs/s, server CPU {cpu:.2f} ms/job "
                f"(system {r.drain_sys[c]:.2f}), raw {raw:,.0f}/s"
            )
            print("  " + cpu_budget(cpu, r.drain_children[c], rate, r.raw_cpu[c], raw))
        if r.cancel_ms:
            print(
                f"{r.backend}: cancel → group gone max {max(r.cancel_ms):.1f} ms; "
                f"→ status canceled p50 / p99 {p(r.cancel_status_ms)} ms"
            )
        if r.load:
            print(f"{r.backend}: load average during drains {', '.join(f'{x:.1f}' for x in r.load)}")


def cpu_budget(server: float, programs: float, rate: float, raw_cpu: tuple[float, float], raw: float) -> str:
    """The drain's CPU bill per job (ms): the server's and its jobs' programs' own (`/bin/true`'s
    start-up and exit), against the cores. However the work overlaps, a drain cannot go faster
    than the rate at which that bill fills every core; the raw spawn pays the same programs with
    far less of its own."""
    cores = os.cpu_count() or 1
    per_job = server + programs
    raw_parent, raw_programs = raw_cpu
    return (
        f"CPU per job {server:.2f} server + {programs:.2f} its processes = {per_job:.2f} ms: "
        f"{cores} cores {rate * per_job / 10 / cores:.0f}% busy, all {cores} full at "
        f"{cores * 1000 / per_job:,.0f} jobs/s; raw spawn {raw_parent:.2f} + {raw_programs:.2f} ms "
        f"({raw * (raw_parent + raw_programs) / 10 / cores:.0f}% busy)"
    )


def data_fs(folder: str) -> str:
    """`folder`'s file system type, as the runner reads it (`manifest.folder_mount`), and for ext4
    whether it has a journal: without one, every file creation scans the inodes freed in the last
    minutes (docs/performance.md, "fewer files per job")."""
    mount = folder_mount(folder)
    if mount is None:
        return "an unknown file system"
    source, kind = mount
    if kind == "ext4":
        journal = os.path.exists(f"/proc/fs/jbd2/{os.path.basename(source)}-8")
        kind += " with a journal" if journal else " without a journal"
    return kind


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--pg-url", default=PG_URL)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--cancels", type=int, default=100)
    ap.add_argument("--skip", nargs="*", choices=["dispatch", "drain", "cancel"], default=[])
    args = ap.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = []
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    # The drains depend on the data folder's file system more than on anything else but the CPU
    # (docs/performance.md, "Dispatch"); `TMPDIR` chooses it.
    print(f"data folders under {tempfile.gettempdir()}, on {data_fs(tempfile.gettempdir())}")
    try:
        for backend in backends:
            res = Result(backend)
            with scratch(backend, args.pg_url) as env:
                if "dispatch" not in args.skip:
                    bench_dispatch(env, res, args.samples)
                if "cancel" not in args.skip:
                    bench_cancel(env, res, args.cancels)
                if "drain" not in args.skip:
                    for c in args.concurrency:
                        bench_drain(env, res, args.jobs, c)
            results.append(res)
            report([res])
        if len(results) > 1:
            report(results)
        print(f"load average at end: {os.getloadavg()[0]:.1f}")
    finally:
        remove_leftovers()


if __name__ == "__main__":
    main()
