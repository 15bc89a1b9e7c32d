"""What the benchmarks share: a free port, a scratch PostgreSQL database, a real `codex-runner
serve` in its own process, a process's CPU time, and percentiles."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def database_url(backend: str, pg_url: str, root: Path, prefix: str) -> Iterator[str]:
    """SQLite under `root/data`, or a new PostgreSQL database `<prefix><hex>` dropped afterwards."""
    if backend != "postgresql":
        yield f"sqlite:///{root / 'data' / 'runner.db'}"
        return
    import psycopg

    dbname = f"{prefix}{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    try:
        yield pg_url.rsplit("/", 1)[0] + "/" + dbname
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@contextmanager
def serve_process(
    root: Path, env: Mapping[str, str], *, cmd: Sequence[str] | None = None, stop_timeout: float = 60
) -> Iterator[tuple[str, int]]:
    """`codex-runner serve` in its own process, its output in `root/server.log`; yields (base URL,
    pid) once /healthz answers, within 60 s."""
    port = free_port()
    log = (root / "server.log").open("ab")
    exe = Path(sys.executable).with_name("codex-runner")
    default = [str(exe), "serve"] if exe.exists() else [sys.executable, "-m", "codex_runner.cli", "serve"]
    proc = subprocess.Popen(
        list(cmd or default),
        env={**os.environ, **env, "RUNNER_PORT": str(port)},
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {root / 'server.log'}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in 60 s")
            time.sleep(0.05)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def cpu_split(pid: int) -> tuple[float, float]:
    """CPU seconds of all the process's threads so far: (user, system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def children_cpu(pid: int) -> float:
    """CPU seconds (user + system) of the process's children that it has reaped so far: for the
    runner, its jobs' processes (`/proc/<pid>/stat`'s cutime and cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def pct(values: list[float], p: float) -> float:
    """The p-th percentile by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]
