"""Sustained job creation over HTTP, and list/get latency with a million jobs in the table against a
near-empty one, on SQLite and PostgreSQL.

    .venv/bin/python bench/api_create.py [--backend sqlite|postgresql|both] [--rows 1000000]
        [--small-rows 5000] [--duration 10] [--concurrency 16] [--users 8] [--samples 500]

Per backend, two scratch databases (temp data dirs; on PostgreSQL databases `cr_bench_api_<hex>` on
`--pg-url`'s server, dropped at the end), each with a runner.toml of 5 local repos and one script,
tokens for an admin, for `--users` load users and for `user000`; the small one gets `--small-rows`
jobs, the big one `--rows`, straight into the database (executemany on SQLite, where the counts
triggers fire as for any insert; COPY with row triggers off on PostgreSQL, then the counts
rebuilt): 200 users with a skewed share (`user000` has ~17%), 5 repos, mostly terminal, 300 queued
/ 150 running / 20 cancel_requested among the newest, two events per job; then ANALYZE. The small table has the same active mix, so every list fills its
50-job page on both and the comparison is about the table's size, not the page's.

Each database gets the real `codex-runner serve` in its own process (RUNNER_ENABLED=false: API only;
queue caps at 10,000,000 so the bench measures creation, not backpressure). Then:

- reads: `--samples` sequential requests per route, one connection per server, the two servers
  asked in turn (same machine conditions for both): the list (default, `?status=queued`,
  `?status=success`, `?repo_id=`) and `GET /api/runner/jobs/{id}` of random jobs, as the admin and as
  `user000`; first, `total` is checked against COUNT(*).
- creates, on each table: `--duration` s after 1 s of warm-up, `--concurrency` keep-alive HTTP/1.1
  connections spread over the load users, unique arguments per request. The load comes from `wrk`
  (C; a Lua script gives each request its arguments and a token) when it is installed, else from a
  lean asyncio client in a process of its own (`--load`): a load generator in Python (httpx) took a
  whole core of the two. Reported: req/s, p50/p95/p99, every answer that is not a 201 (by status)
  and socket errors, the server's CPU per request, the load average; then the jobs the database
  gained are checked against the 201 answers (wrk stops with requests in flight, so up to one per
  connection and phase may be written unanswered).

Prints tables; not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from _serve import cpu_seconds, database_url, pct, serve_process
from codex_runner.config import load_settings
from codex_runner.runtime import Runtime
from codex_runner.store.schema import events, job_counts, jobs

PG_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REPOS = ["alpha", "beta", "gamma", "delta", "epsilon"]
REPO_WEIGHTS = [50, 25, 12, 8, 5]
SEED_USERS = 200
TERMINAL_MIX = [("success", 80), ("failed", 12), ("canceled", 5), ("timeout", 3)]
ACTIVE_MIX = [("queued", 300), ("running", 150), ("cancel_requested", 20)]
STAGES = ("prepare", "script", "commit", "push", "cleanup")
SEED_CACHE_KIB = 1024 * 1024

RUNNER_TOML = """
[runner]
max_queue_size = 10000000
max_queued_per_user = 10000000
{repos}
[scripts.echo]
label = "Echo"
command = ["/bin/echo", "{{message}}"]
timeout_seconds = 600

[scripts.echo.args.message]
type = "string"
required = true
max_length = 200

[scripts.echo.args.count]
type = "int"
min = 1
max = 10
default = 1
flag = "--count"
"""


# -- statistics -------------------------------------------------------------------------------


@dataclass
class CreateResult:
    requests: int  # answers in the measured window
    seconds: float
    p50: float  # ms
    p95: float
    p99: float
    errors: dict[str, int]  # non-201 answers by status, and socket errors, in the measured window
    created: int  # 201 answers, warm-up included
    sent: int  # answers, warm-up included
    tool: str
    server_cpu: float = 0.0  # server CPU seconds per wall second, warm-up included
    cpu_per_request: float = 0.0  # server CPU seconds
    rows_written: int = 0  # jobs the database gained meanwhile; must equal `created`
    load_average: float = 0.0
    in_flight_at_stop: int = 0  # requests the load may have left unanswered when it stopped

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


@dataclass
class Env:
    backend: str
    root: Path
    env: dict[str, str]
    database_url: str
    admin: str = ""
    load_tokens: list[str] = field(default_factory=list)
    user_tokens: dict[str, str] = field(default_factory=dict)


# -- set-up -----------------------------------------------------------------------------------


@contextmanager
def scratch(backend: str, pg_url: str) -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix=f"cr-bench-{backend}-"))
    try:
        with database_url(backend, pg_url, root, "cr_bench_api_") as url:
            repo_tables = ""
            for name in REPOS:
                (root / "repos" / name).mkdir(parents=True)
                repo_tables += (
                    f'\n[repos.{name}]\nsource = "{root / "repos" / name}"\nworkspace = "scratch"\n'
                )
            (root / "runner.toml").write_text(textwrap.dedent(RUNNER_TOML.format(repos=repo_tables)))
            env = {
                "RUNNER_CONFIG": str(root / "runner.toml"),
                "RUNNER_DATA_DIR": str(root / "data"),
                "RUNNER_DATABASE_URL": url,
                "RUNNER_ENABLED": "false",
                "RUNNER_ALLOWED_REPO_PATHS": str(root / "repos"),
                "RUNNER_ID": f"bench-{backend}",
                "RUNNER_LOG_FORMAT": "json",
                # The seeded jobs go 30 days back: retention inside `serve` would delete the
                # oldest while the bench measures.
                "RUNNER_RETENTION_DAYS": "3650",
            }
            yield Env(backend, root, env, url)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def open_runtime(env: Env) -> Runtime:
    return Runtime.open(load_settings(env.env, cwd=env.root))


def make_tokens(env: Env, users: int) -> None:
    rt = open_runtime(env)  # also migrates and registers the repos
    try:
        env.admin, _ = rt.tokens.create("root", "admin", "bench")
        env.load_tokens = [rt.tokens.create(f"load{i:02d}", "user", "bench")[0] for i in range(users)]
        env.user_tokens["user000"] = rt.tokens.create("user000", "user", "bench")[0]
    finally:
        rt.close()


@contextmanager
def server(env: Env) -> Iterator[tuple[str, int]]:
    """`codex-runner serve` in its own process; yields (base URL, pid)."""
    with serve_process(env.root, env.env, stop_timeout=30) as served:
        yield served


# -- seeding ----------------------------------------------------------------------------------


def _iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds") + "Z"


def _stages_json(status: str, at: datetime) -> str:
    """A job's `stages` as the runner leaves them for `status` (the times are typical, not exact)."""
    stages: list[dict[str, Any]] = [
        {"name": n, "status": "pending", "started_at": None, "finished_at": None, "exit_code": None}
        for n in STAGES
    ]
    if status != "queued":
        done = 5 if status == "success" else 2
        for i, st in enumerate(stages[:done]):
            st.update(status="success", exit_code=0)
            st["started_at"] = _iso(at + timedelta(seconds=i))
            st["finished_at"] = _iso(at + timedelta(seconds=i + 1))
        if status in ("failed", "timeout", "canceled"):
            stages[1].update(status="failed", exit_code=1)
        if status in ("running", "cancel_requested"):
            stages[1].update(status="running", finished_at=None, exit_code=None)
    return json.dumps(stages)


LAST_EVENT = {
    "success": "job_succeeded",
    "failed": "job_failed",
    "canceled": "job_canceled",
    "timeout": "job_timeout",
    "running": "job_started",
    "cancel_requested": "job_started",
}
ERRORS = {
    "failed": (1, "script_failed", "the script exited with status 1"),
    "timeout": (137, "timeout", "the job ran past its timeout"),
    "canceled": (None, "canceled", None),
    "success": (0, None, None),
}


def seed_rows(
    count: int, repo_ids: dict[str, str], rng: random.Random, ts: Callable[[datetime | None], Any]
) -> Iterator[tuple[tuple, list[tuple]]]:
    """`count` jobs (columns in JOB_COLS order, JSON as text, times through `ts`), oldest first over
    the last 30 days, the active ones among the newest; each with its `job_created` event and, once
    started, its last event (EVENT_COLS order)."""
    now = datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=1)
    start = now - timedelta(days=30)
    step = (now - start) / max(count, 1)
    users = [f"user{i:03d}" for i in range(SEED_USERS)]
    user_weights = [1 / (i + 1) for i in range(SEED_USERS)]
    active = [s for s, n in ACTIVE_MIX for _ in range(n)]
    n_active = min(len(active), count // 10)
    rng.shuffle(active)
    statuses = [s for s, _ in TERMINAL_MIX]
    weights = [w for _, w in TERMINAL_MIX]
    chosen_users = rng.choices(users, user_weights, k=count)
    chosen_repos = rng.choices(REPOS, REPO_WEIGHTS, k=count)
    chosen_status = rng.choices(statuses, weights, k=count)
    stages = {st: _stages_json(st, now) for st in [*statuses, *(s for s, _ in ACTIVE_MIX)]}
    created_meta = {r: json.dumps({"script_key": "echo", "repo": r}) for r in REPOS}
    pad = "x" * 120
    for i in range(count):
        created = start + step * i
        status = active[i - (count - n_active)] if i >= count - n_active else chosen_status[i]
        repo, user = chosen_repos[i], chosen_users[i]
        job_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        running = status in ("running", "cancel_requested")
        started = finished = None
        if status != "queued":
            started = created + timedelta(seconds=rng.uniform(0.05, 5))
            if not running:
                finished = started + timedelta(seconds=rng.uniform(2, 900))
        exit_code, error_code, error_message = ERRORS.get(status, (None, None, None))
        result = None
        if status == "success":
            result = (
                f'{{"branch": "runner/{job_id[:8]}", "base_branch": "main", '
                f'"commit": "{rng.getrandbits(160):040x}", "pushed": false, '
                f'"files_changed": {i % 20}, "lines_added": {i % 500}, "lines_removed": {i % 200}}}'
            )
        row = (
            job_id,
            repo_ids[repo],
            repo,
            "scratch",
            "echo",
            f'{{"message": "seed job {i} {pad[: 10 + i % 110]}"}}',
            status,
            user,
            ts(created),
            ts(started),
            ts(finished),
            ts(now if running else finished),
            600,
            exit_code,
            error_code,
            error_message,
            ts(started if status == "cancel_requested" else None),
            "bench-seed" if started is not None else None,
            uuid.uuid4().hex if running else None,
            1 if started is not None else 0,
            stages[status],
            result,
            None,
            None,
            None,
        )
        evs = [(job_id, "job_created", user, "job created", created_meta[repo], ts(created))]
        if started is not None:
            last = LAST_EVENT[status]
            evs.append((job_id, last, "system", last.replace("_", " "), "{}", ts(finished or started)))
        yield row, evs


JOB_COLS = [c.name for c in jobs.c]
EVENT_COLS = ["job_id", "event_type", "actor", "message", "meta", "created_at"]
assert JOB_COLS == [
    "id",
    "repo_id",
    "repo",
    "workspace_mode",
    "script_key",
    "args",
    "status",
    "requested_by",
    "created_at",
    "started_at",
    "finished_at",
    "heartbeat_at",
    "timeout_seconds",
    "exit_code",
    "error_code",
    "error_message",
    "cancel_requested_at",
    "runner_id",
    "lease_token",
    "attempt",
    "stages",
    "result",
    "pid",
    "pgid",
    "proc_start_time",
], "seed_rows yields the columns in this order"


def _sqlite_ts(value: datetime | None) -> str | None:
    """How SQLAlchemy's SQLite DateTime stores a time."""
    return None if value is None else value.isoformat(" ", "microseconds")


def _pg_ts(value: datetime | None) -> datetime | None:
    return value


def _pg_copy(cur: Any, table: str, cols: list[str], rows: list[tuple]) -> None:
    with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
        for r in rows:
            copy.write_row(r)


def _sqlite_insert(cur: Any, table: str, cols: list[str], rows: list[tuple]) -> None:
    cur.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", rows)


def seed(env: Env, count: int, *, batch: int = 100_000) -> float:
    """Adds `count` jobs straight into the database; returns the seconds it took."""
    if count <= 0:
        return 0.0
    t0 = time.perf_counter()
    rt = open_runtime(env)
    raw = rt.engine.raw_connection()
    try:
        repo_ids = {r.name: r.id for r in rt.catalog.repos.values()}
        pg = env.backend == "postgresql"
        rows = seed_rows(count, repo_ids, random.Random(20261123), _pg_ts if pg else _sqlite_ts)
        insert = _pg_copy if pg else _sqlite_insert
        if pg:
            # Row triggers off for the load (the foreign key checks, and the counts trigger: one
            # transaction that bumps the same few hundred counts rows 100,000 times makes each
            # bump walk all of its earlier versions); the counts are rebuilt below, and the
            # bench checks the API's totals against COUNT(*) before it measures anything.
            raw.cursor().execute("SET session_replication_role = replica")
        if not pg:
            # A big page cache for this connection: the random-UUID primary key and ten indexes
            # touch pages all over the file.
            raw.cursor().execute(f"PRAGMA cache_size=-{SEED_CACHE_KIB}")
            # A bulk load that can be redone: no fsync, one checkpoint at the end.
            raw.cursor().execute("PRAGMA synchronous=OFF")
            raw.cursor().execute("PRAGMA wal_autocheckpoint=0")
        done = 0
        while done < count:
            chunk = [next(rows) for _ in range(min(batch, count - done))]
            cur = raw.cursor()
            if not pg:
                cur.execute("BEGIN IMMEDIATE")
            insert(cur, jobs.name, JOB_COLS, [r for r, _ in chunk])
            insert(cur, events.name, EVENT_COLS, [e for _, evs in chunk for e in evs])
            raw.commit() if pg else cur.execute("COMMIT")
            cur.close()
            done += len(chunk)
            print(
                f"\r  seeding {done:,}/{count:,} jobs ({time.perf_counter() - t0:.0f} s)", end="", flush=True
            )
        print()
        if pg:
            cur = raw.cursor()
            cur.execute(f"DELETE FROM {job_counts.name}")
            cur.execute(
                f"INSERT INTO {job_counts.name} (status, requested_by, repo_id, n) "
                f"SELECT status, requested_by, repo_id, COUNT(*) FROM {jobs.name} "
                "GROUP BY status, requested_by, repo_id"
            )
            raw.commit()
        # Outside any transaction: VACUUM and checkpoints need that.
        if pg:
            raw.driver_connection.autocommit = True  # type: ignore[union-attr]
            raw.cursor().execute("VACUUM ANALYZE")
        else:
            raw.cursor().execute("ANALYZE")
            raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        raw.close()
        rt.close()
    return time.perf_counter() - t0


def table_facts(env: Env) -> dict[str, Any]:
    rt = open_runtime(env)
    try:
        with rt.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(jobs)).scalar_one()
            mine = conn.execute(
                sa.select(sa.func.count()).select_from(jobs).where(jobs.c.requested_by == "user000")
            ).scalar_one()
            rand = "random()"
            admin_ids = list(conn.execute(sa.select(jobs.c.id).order_by(sa.text(rand)).limit(500)).scalars())
            user_ids = list(
                conn.execute(
                    sa.select(jobs.c.id)
                    .where(jobs.c.requested_by == "user000")
                    .order_by(sa.text(rand))
                    .limit(500)
                ).scalars()
            )
        repo_id = next(r.id for r in rt.catalog.repos.values() if r.name == "beta")
    finally:
        rt.close()
    return {
        "total": total,
        "user_rows": mine,
        "admin_ids": admin_ids,
        "user_ids": user_ids,
        "repo_id": repo_id,
    }


# -- load -------------------------------------------------------------------------------------

# wrk's script: unique arguments per request, the load users' tokens in turn, and every answer that
# is not a 201 counted by status (wrk itself only counts non-2xx/3xx, and a 200 here would be a
# replay, not a creation).
WRK_SCRIPT = """
local tokens = {%(tokens)s}
local threads = {}
local next_id = 0
function setup(thread)
  next_id = next_id + 1
  thread:set("tid", next_id)
  table.insert(threads, thread)
end
function init(args)
  n = 0
  statuses = {}
end
function request()
  n = n + 1
  local body = '{"repo":"%(repo)s","script_key":"echo","args":{"message":"bench %(run)s ' .. tid .. '-' .. n .. '"}}'
  return wrk.format("POST", "/api/runner/jobs", {
    ["Authorization"] = "Bearer " .. tokens[(n %% #tokens) + 1],
    ["Content-Type"] = "application/json",
  }, body)
end
function response(status, headers, body)
  if status ~= 201 then
    local k = tostring(status)
    statuses[k] = (statuses[k] or 0) + 1
  end
end
function done(summary, latency, requests)
  local bad = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do bad[k] = (bad[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(bad) do table.insert(parts, string.format('"%%s": %%d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %%d, "us": %%d, "p50": %%d, "p95": %%d, "p99": %%d, "statuses": {%%s}, ' ..
    '"connect": %%d, "read": %%d, "write": %%d, "timeout": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), table.concat(parts, ", "), e.connect, e.read, e.write, e.timeout))
end
"""


def _wrk(url: str, script: Path, seconds: float, concurrency: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            "wrk",
            f"-t{min(2, concurrency)}",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "30s",
            "-s",
            str(script),
            url + "/api/runner/jobs",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    res: dict[str, Any] = json.loads(line[len("RESULT ") :])
    return res


def wrk_load(url: str, tokens: list[str], repo: str, duration: float, concurrency: int) -> CreateResult:
    """1 s of warm-up, then `duration` s measured, with wrk (C, a few % of a core at these rates)."""
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for phase, seconds in (("warm", 1.0), ("run", duration)):
            script = Path(tmp) / f"{phase}.lua"
            tokens_lua = ", ".join(f'"{t}"' for t in tokens)
            run = f"{phase}{uuid.uuid4().hex[:8]}"
            script.write_text(WRK_SCRIPT % {"tokens": tokens_lua, "repo": repo, "run": run})
            results.append(_wrk(url, script, seconds, concurrency))
    warm, res = results
    errors = {k: int(v) for k, v in res["statuses"].items()}
    for kind in ("connect", "read", "write", "timeout"):
        if res[kind]:
            errors[kind] = int(res[kind])
    # wrk's `requests` are answers: a socket error is not one, and whether its job was made is unknown.
    created = (
        warm["requests"] - sum(warm["statuses"].values()) + res["requests"] - sum(res["statuses"].values())
    )
    unknown = sum(int(phase[k]) for phase in (warm, res) for k in ("connect", "read", "write", "timeout"))
    sent = warm["requests"] + res["requests"]
    return CreateResult(
        requests=res["requests"],
        seconds=res["us"] / 1e6,
        p50=res["p50"] / 1000,
        p95=res["p95"] / 1000,
        p99=res["p99"] / 1000,
        errors=errors,
        created=created,
        sent=sent,
        tool="wrk",
        in_flight_at_stop=2 * concurrency + unknown,
    )


async def _raw_load(
    host: str, port: int, tokens: list[str], repo: str, duration: float, concurrency: int
) -> CreateResult:
    """A lean HTTP/1.1 client: request bytes built from a template, only the status line and
    Content-Length parsed. Runs in a process of its own, off the server's core."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    warmup_end = time.perf_counter() + 1.0
    end = warmup_end + duration
    created = sent = 0
    run = uuid.uuid4().hex[:8]

    async def worker(w: int) -> None:
        nonlocal created, sent
        reader, writer = await asyncio.open_connection(host, port)
        head = (
            f"POST /api/runner/jobs HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {tokens[w % len(tokens)]}\r\nContent-Type: application/json\r\n"
        ).encode()
        seq = 0
        try:
            while (t0 := time.perf_counter()) < end:
                seq += 1
                body = (
                    f'{{"repo":"{repo}","script_key":"echo","args":{{"message":"bench {run} {w}-{seq}"}}}}'
                ).encode()
                writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                t1 = time.perf_counter()
                status = status_line.split(b" ", 2)[1].decode()
                created += status == "201"
                sent += 1
                if t0 < warmup_end:
                    continue
                latencies.append((t1 - t0) * 1000)
                if status != "201":
                    errors[status] = errors.get(status, 0) + 1
        except (OSError, asyncio.IncompleteReadError, IndexError) as exc:
            # A dead connection ends its worker; its last request's fate is unknown.
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return CreateResult(
        requests=len(latencies),
        seconds=duration,
        p50=pct(latencies, 50),
        p95=pct(latencies, 95),
        p99=pct(latencies, 99),
        errors=errors,
        created=created,
        sent=sent,
        tool="asyncio client",
        in_flight_at_stop=sum(n for k, n in errors.items() if not k.isdigit()),
    )


def raw_load(url: str, tokens: list[str], repo: str, duration: float, concurrency: int) -> CreateResult:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return asyncio.run(_raw_load(host, int(port), tokens, repo, duration, concurrency))


def job_rows(env: Env) -> int:
    rt = open_runtime(env)
    try:
        with rt.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(jobs)).scalar_one())
    finally:
        rt.close()


def run_creates(url: str, pid: int, env: Env, args: argparse.Namespace) -> CreateResult:
    use_wrk = args.load == "wrk" or (args.load == "auto" and shutil.which("wrk"))
    load = wrk_load if use_wrk else raw_load
    rows0 = job_rows(env)
    # The load generator in a process of its own (wrk is one anyway): in this one it would share a
    # GIL with nothing, but the process must not be the server's either.
    with ProcessPoolExecutor(1) as pool:
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        fut = pool.submit(load, url, env.load_tokens, "alpha", args.duration, args.concurrency)
        res = fut.result()
        cpu, wall = cpu_seconds(pid) - cpu0, time.perf_counter() - t0
    res.server_cpu = cpu / wall
    res.cpu_per_request = cpu / max(res.sent, 1)
    res.rows_written = job_rows(env) - rows0
    res.load_average = os.getloadavg()[0]
    return res


@dataclass
class Target:
    """One running server over one scratch database, with what the reads need."""

    url: str
    env: Env
    facts: dict[str, Any]


def read_latency(
    small: Target, big: Target, samples: int
) -> dict[str, tuple[tuple[float, float], tuple[float, float]]]:
    """(p50, p99) in ms on the small and on the big table of `samples` sequential requests per route
    and token. The two servers are asked in turn, request by request, so that both see the same
    machine: on a shared machine, two runs minutes apart differ more than the tables do."""
    out: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {}

    def routes(t: Target, who: str) -> dict[str, list[str]]:
        ids = t.facts["admin_ids" if who == "admin" else "user_ids"]
        paths = {
            "list": "/api/runner/jobs",
            "list ?status=queued": "/api/runner/jobs?status=queued",
            "list ?status=success": "/api/runner/jobs?status=success",
            "list ?repo_id=": f"/api/runner/jobs?repo_id={t.facts['repo_id']}",
        }
        out = {name: [path] * samples for name, path in paths.items()}
        out["get"] = [f"/api/runner/jobs/{ids[i % len(ids)]}" for i in range(samples)]
        return out

    for who in ("admin", "user"):
        clients = [
            httpx.Client(
                base_url=t.url,
                headers={
                    "Authorization": f"Bearer {t.env.admin if who == 'admin' else t.env.user_tokens['user000']}"
                },
                timeout=30,
            )
            for t in (small, big)
        ]
        small_routes, big_routes = routes(small, who), routes(big, who)
        try:
            for name in small_routes:
                lat: tuple[list[float], list[float]] = ([], [])
                pairs = list(zip(small_routes[name], big_routes[name], strict=True))
                for k, pair in enumerate(pairs[:10] + pairs):  # the first 10 warm up
                    for side in (0, 1):
                        t0 = time.perf_counter()
                        r = clients[side].get(pair[side])
                        if k >= 10:
                            lat[side].append((time.perf_counter() - t0) * 1000)
                        r.raise_for_status()
                out[f"{who} {name}"] = (
                    (statistics.median(lat[0]), pct(lat[0], 99)),
                    (statistics.median(lat[1]), pct(lat[1], 99)),
                )
        finally:
            for c in clients:
                c.close()
    return out


def check_totals(url: str, env: Env, facts: dict[str, Any]) -> None:
    """The API's `total` must be the exact row count, for the admin and for the user."""
    for token, expected in ((env.admin, facts["total"]), (env.user_tokens["user000"], facts["user_rows"])):
        r = httpx.get(url + "/api/runner/jobs?limit=1", headers={"Authorization": f"Bearer {token}"})
        total = r.raise_for_status().json()["total"]
        if total != expected:
            raise SystemExit(f"list total {total} != COUNT(*) {expected}")


# -- report -----------------------------------------------------------------------------------


def print_creates(label: str, res: CreateResult) -> None:
    errs = ", ".join(f"{k}: {v}" for k, v in sorted(res.errors.items())) or "0"
    print(
        f"  creates [{label}, {res.tool}]: {res.rate:,.0f} req/s, p50 {res.p50:.1f} ms, "
        f"p95 {res.p95:.1f} ms, p99 {res.p99:.1f} ms, errors {errs}"
    )
    # The server runs its Python on one core at a time (the GIL): its CPU per request bounds what a
    # whole free core would give, whatever else the machine is doing.
    print(
        f"    server CPU {res.server_cpu * 100:.0f}% of a core, {res.cpu_per_request * 1000:.2f} ms per "
        f"request (≈ {1 / max(res.cpu_per_request, 1e-9):,.0f} req/s on one free core); "
        f"load average {res.load_average:.1f}"
    )
    # wrk stops with requests in flight: the server may still create those jobs after wrk has
    # stopped reading, at most one per connection and phase (the asyncio client waits for them).
    unanswered = res.rows_written - res.created
    ok = 0 <= unanswered <= res.in_flight_at_stop
    print(
        f"    201 answers {res.created:,}, jobs written {res.rows_written:,} "
        f"({unanswered} in flight when the load stopped, at most {res.in_flight_at_stop}): "
        f"{'ok' if ok else 'MISMATCH'}"
    )
    if not ok:
        raise SystemExit("the jobs written do not match the 201 answers")


def _rows(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1_000_000 else f"{n / 1e3:.0f}k"


def print_reads(
    reads: dict[str, tuple[tuple[float, float], tuple[float, float]]], small: str, big: str
) -> None:
    print(
        f"  {'reads (ms)':<26} {small + ' p50':>11} {'p99':>7} {big + ' p50':>11} {'p99':>7} {'p50 ratio':>10}"
    )
    for name, ((s50, s99), (b50, b99)) in reads.items():
        print(f"  {name:<26} {s50:>11.2f} {s99:>7.2f} {b50:>11.2f} {b99:>7.2f} {b50 / s50:>9.2f}x")


def run_backend(backend: str, args: argparse.Namespace) -> None:
    print(f"== {backend} ==")
    with scratch(backend, args.pg_url) as small_env, scratch(backend, args.pg_url) as big_env:
        for env in (small_env, big_env):
            make_tokens(env, args.users)
        seed(small_env, args.small_rows)
        took = seed(big_env, args.rows)
        small_facts, big_facts = table_facts(small_env), table_facts(big_env)
        for facts in (small_facts, big_facts):
            print(f"  table: {facts['total']:,} jobs (user000: {facts['user_rows']:,})")
        print(f"  ({took:.0f} s to seed the big one)")
        with server(small_env) as (small_url, small_pid), server(big_env) as (big_url, big_pid):
            small = Target(small_url, small_env, small_facts)
            big = Target(big_url, big_env, big_facts)
            for t in (small, big):
                check_totals(t.url, t.env, t.facts)
            if args.samples > 0:
                reads = read_latency(small, big, args.samples)
                print_reads(reads, _rows(small_facts["total"]), _rows(big_facts["total"]))
            for url, pid, env, facts in (
                (small_url, small_pid, small_env, small_facts),
                (big_url, big_pid, big_env, big_facts),
            ):
                print_creates(f"{facts['total']:,} rows", run_creates(url, pid, env, args))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--rows", type=int, default=1_000_000, help="jobs in the table for the big phase")
    parser.add_argument(
        "--small-rows", type=int, default=5000, help="jobs in the small table (enough for full pages)"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of creates per phase")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent HTTP connections")
    parser.add_argument("--users", type=int, default=8, help="load users the creates are spread over")
    parser.add_argument("--samples", type=int, default=500, help="sequential requests per read route")
    parser.add_argument(
        "--load",
        choices=["auto", "wrk", "asyncio"],
        default="auto",
        help="load generator for the creates: wrk if installed, else a lean asyncio client",
    )
    parser.add_argument("--pg-url", default=PG_URL, help="PostgreSQL server (admin database URL)")
    args = parser.parse_args()
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; duration {args.duration:g} s, "
        f"concurrency {args.concurrency}, {args.users} load users, {args.samples} samples per read"
    )
    for backend in ("sqlite", "postgresql") if args.backend == "both" else (args.backend,):
        t0 = time.perf_counter()
        run_backend(backend, args)
        print(f"  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
