"""Real `codex-runner serve`/`worker` processes on a shared database, for the chaos tests and
bench/recovery.py: start, SIGKILL, SIGSTOP/SIGCONT, restart with the same RUNNER_ID; submit jobs
straight into the store; read rows, events and the ledger; find and kill every process a test
started, job process groups included."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from codex_runner.config import load_settings
from codex_runner.runtime import Runtime
from codex_runner.store.admin import Principal
from codex_runner.store.schema import events, instances, jobs

ROOT = Path(__file__).resolve().parents[2]
CODEX_RUNNER = Path(sys.executable).parent / "codex-runner"
BEHAVE = ROOT / "tests" / "integration" / "scripts" / "behave.py"
TERMINAL = {"success", "failed", "canceled", "timeout"}
TERMINAL_EVENTS = {
    "job_succeeded",
    "job_failed",
    "job_canceled",
    "job_timeout",
    "heartbeat_stale_recovered",
    "recovered_after_crash",
}

TOML = """
[repos.scratch]
source = "{repo}"
workspace = "scratch"

[repos.inplace]
source = "{repo}"
workspace = "in_place"
commit = false

[repos.pushed]
source = "{repo}"
workspace = "worktree"
commit = true
push = true

[scripts.behave]
command = ["{python}", "{behave}"]
timeout_seconds = 300

[scripts.behave.args.sleep]
type = "string"
pattern = "^[0-9.]+$"
flag = "--sleep"

[scripts.behave.args.ledger]
type = "string"
flag = "--ledger"

[scripts.behave.args.grandchild]
type = "bool"
flag = "--grandchild"

[scripts.behave.args.files]
type = "int"
flag = "--files"
"""

#: Small values so the tests see recovery in seconds (the issue's acceptance uses these).
FAST_ENV = {
    "RUNNER_HEARTBEAT_SECONDS": "1",
    "RUNNER_STALE_AFTER_SECONDS": "3",
    "RUNNER_KILL_GRACE_SECONDS": "1",
    "RUNNER_POLL_INTERVAL_SECONDS": "0.2",
    "RUNNER_MAX_QUEUE_SIZE": "5000",
    "RUNNER_MAX_QUEUED_PER_USER": "5000",
    "RUNNER_LOG_FORMAT": "json",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Polls until `predicate()` is truthy; returns its value, or fails naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def processes_with_env(prefix: bytes) -> dict[int, bytes]:
    """pid → the first environment entry starting with `prefix`, for every live process."""
    found: dict[int, bytes] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as fh:
                environ = fh.read()
        except OSError:
            continue
        for var in environ.split(b"\0"):
            if var.startswith(prefix):
                found[int(entry.name)] = var
                break
    return found


def job_pids(job_ids: Iterable[str]) -> dict[str, list[int]]:
    """Live processes that carry `RUNNER_JOB_ID` of one of these jobs."""
    wanted = {f"RUNNER_JOB_ID={j}".encode() for j in job_ids}
    out: dict[str, list[int]] = defaultdict(list)
    for pid, var in processes_with_env(b"RUNNER_JOB_ID=").items():
        if var in wanted:
            out[var.split(b"=", 1)[1].decode()].append(pid)
    return dict(out)


@dataclass
class Instance:
    runner_id: str
    mode: str
    proc: subprocess.Popen[bytes]
    port: int | None
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    """Runner instances in `tmp` on `database_url`. Use as a context manager: leaving it SIGKILLs
    every instance it started and every process that runs in one of its workspaces."""

    tmp: Path
    database_url: str
    env: dict[str, str] = field(default_factory=dict)
    instances: list[Instance] = field(default_factory=list)
    runtime: Runtime = field(init=False)
    ledger: Path = field(init=False)

    def __post_init__(self) -> None:
        from tests.helpers import make_git_repo

        self.tmp.mkdir(parents=True, exist_ok=True)
        repo = make_git_repo(self.tmp / "repo")
        self.config = self.tmp / "runner.toml"
        self.config.write_text(textwrap.dedent(TOML.format(repo=repo, python=sys.executable, behave=BEHAVE)))
        self.ledger = self.tmp / "ledger.txt"
        self.ledger.touch()
        # The test's own handle on the database: migrates it, creates jobs, reads rows.
        settings = load_settings(self._env("client"), cwd=self.tmp)
        self.runtime = Runtime.open(settings)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _env(self, runner_id: str, **extra: str) -> dict[str, str]:
        return {
            **FAST_ENV,
            "RUNNER_CONFIG": str(self.config),
            "RUNNER_DATABASE_URL": self.database_url,
            "RUNNER_DATA_DIR": str(self.tmp / f"data-{runner_id}"),
            "RUNNER_ID": runner_id,
            **self.env,
            **extra,
        }

    # -- instances ----------------------------------------------------------------------------

    def start(self, runner_id: str, mode: str = "worker", *, wait: bool = True, **extra: str) -> Instance:
        port = free_port() if mode == "serve" else None
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
        env.update(self._env(runner_id, **extra))
        if port is not None:
            env["RUNNER_PORT"] = str(port)
        out = open(self.tmp / f"{runner_id}.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(
            [str(CODEX_RUNNER), mode],
            cwd=self.tmp,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        inst = Instance(runner_id, mode, proc, port, time.monotonic())
        self.instances.append(inst)
        if wait:
            self.wait_ready(inst)
        return inst

    def wait_ready(self, inst: Instance, timeout: float = 60) -> None:
        """Registered in the database (which start-up recovery follows at once)."""

        def registered() -> bool:
            if inst.proc.poll() is not None:
                raise AssertionError(
                    f"{inst.runner_id} exited with {inst.proc.returncode}: {self.tail(inst)}"
                )
            with self.runtime.engine.connect() as conn:
                pid = conn.execute(
                    sa.select(instances.c.pid).where(instances.c.id == inst.runner_id)
                ).scalar()
            return pid == inst.pid

        wait_for(registered, timeout, f"{inst.runner_id} to register")

    def tail(self, inst: Instance, lines: int = 20) -> str:
        path = self.tmp / f"{inst.runner_id}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def sigkill(self, inst: Instance) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(inst.pid, signal.SIGKILL)
        inst.proc.wait(timeout=10)

    def close(self) -> None:
        for inst in self.instances:
            with contextlib.suppress(ProcessLookupError):
                os.kill(inst.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                inst.proc.wait(timeout=10)
        # Job processes of this cluster: their workspace is under tmp (RUNNER_WORKSPACE).
        prefix = f"RUNNER_WORKSPACE={self.tmp}".encode()
        for _ in range(50):
            found = processes_with_env(prefix)
            if not found:
                break
            for pid in found:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        self.runtime.close()

    # -- jobs ---------------------------------------------------------------------------------

    def submit(
        self, n: int, *, user: str = "alice", sleep: Callable[[], float] | float = 0.2, repo: str = "scratch"
    ) -> list[str]:
        ids = []
        for _ in range(n):
            seconds = sleep() if callable(sleep) else sleep
            body = {
                "repo": repo,
                "script_key": "behave",
                "args": {"sleep": f"{seconds:.3f}", "ledger": str(self.ledger)},
            }
            job, _ = self.runtime.create_job(Principal(user, "user"), body)
            ids.append(job["id"])
        return ids

    def rows(self, ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        query = sa.select(jobs)
        if ids is not None:
            query = query.where(jobs.c.id.in_(list(ids)))
        with self.runtime.engine.connect() as conn:
            return {r["id"]: dict(r) for r in conn.execute(query).mappings()}

    def events(self) -> dict[str, list[dict[str, Any]]]:
        return self.snapshot()[1]

    def snapshot(self) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        """Rows and events as of one instant (one repeatable-read transaction)."""
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        with self.runtime.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                rows = {r["id"]: dict(r) for r in conn.execute(sa.select(jobs)).mappings()}
                for r in conn.execute(sa.select(events).order_by(events.c.id)).mappings():
                    out[r["job_id"]].append(dict(r))
        return rows, dict(out)

    def ledger_ids(self) -> list[str]:
        return [line for line in self.ledger.read_text().splitlines() if line]

    def running_of(self, runner_id: str) -> set[str]:
        return {
            i
            for i, r in self.rows().items()
            if r["runner_id"] == runner_id and r["status"] in ("running", "cancel_requested")
        }

    def all_done(self, ids: Iterable[str]) -> bool:
        rows = self.rows(ids)
        return all(r["status"] in TERMINAL for r in rows.values())


def check_invariants(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """What must hold at any moment: exactly one terminal event per terminal job and none for an
    active one; a job that was never claimed is still queued; no script ran twice; a job in the
    ledger was claimed exactly once."""
    # The ledger first: a script writes its line only after its claim committed, so every job in it
    # shows its claim in the rows read next. Read the other way round while an instance runs, a job
    # claimed between the two reads is in the ledger but still queued in the older rows.
    ledger = cluster.ledger_ids()
    rows, evs = cluster.snapshot()
    for job_id, row in rows.items():
        kinds = [e["event_type"] for e in evs.get(job_id, [])]
        terminal = [k for k in kinds if k in TERMINAL_EVENTS]
        if row["status"] in TERMINAL:
            assert len(terminal) == 1, (job_id, row["status"], kinds)
        else:
            assert terminal == [], (job_id, row["status"], kinds)
        assert kinds.count("job_started") == row["attempt"] <= 1, (job_id, row["attempt"], kinds)
        if row["attempt"] == 0:
            assert row["status"] == "queued" and row["started_at"] is None, (job_id, row["status"])
    duplicates = {j for j in ledger if ledger.count(j) > 1}
    assert not duplicates, f"scripts that ran twice: {duplicates}"
    for job_id in ledger:
        assert rows[job_id]["attempt"] == 1, (job_id, rows[job_id]["status"])
    return rows


def max_overlap(intervals: Iterable[tuple[datetime, datetime]], slack: float = 0.0) -> int:
    """Most intervals open at one instant. Each interval starts `slack` seconds late: a claim
    stamps `started_at` just before it waits for the scheduler lock, so a start may look earlier than
    the finish it actually followed."""
    points: list[tuple[float, int]] = []
    for start, end in intervals:
        s, e = start.timestamp() + slack, end.timestamp()
        if e > s:
            points += [(s, 1), (e, -1)]
    points.sort(key=lambda p: (p[0], p[1]))
    best = current = 0
    for _, delta in points:
        current += delta
        best = max(best, current)
    return best


def excess_seconds(intervals: Iterable[tuple[datetime, datetime]], limit: int) -> float:
    """Longest stretch during which more than `limit` intervals were open (raw timestamps)."""
    points = sorted(
        [(s.timestamp(), 1) for s, _ in intervals] + [(e.timestamp(), -1) for _, e in intervals],
        key=lambda p: (p[0], p[1]),
    )
    longest, current, since = 0.0, 0, 0.0
    for at, delta in points:
        if current > limit:
            longest = max(longest, at - since)
        current += delta
        since = at
    return longest


def random_sleep(low: float, high: float, rng: random.Random) -> Callable[[], float]:
    return lambda: rng.uniform(low, high)


def http_status(url: str, path: str, token: str, timeout: float = 10) -> int:
    try:
        return httpx.get(
            url + path, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        ).status_code
    except httpx.HTTPError:
        return 0
