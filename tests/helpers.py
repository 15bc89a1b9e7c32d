"""Test helpers shared by the layers: a real uvicorn server on a free loopback port, waits with
timeouts, a runner.toml writer, the statements a store runs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI

from codex_runner.store import JobStore
from codex_runner.store.prepared import Prepared

#: The console script of the venv the tests run in.
CLI = str(Path(sys.executable).parent / "codex-runner")


def unprivileged() -> list[str]:
    """What makes a command run as an ordinary user's would: as root every process holds every
    capability (CAP_SYS_PTRACE reads any process's /proc, CAP_DAC_OVERRIDE opens a `chmod 000`
    folder), whatever a test checks; without them, root's processes are a user like any other
    (still the owner of the files root made). Nothing to add when not root; skips without
    util-linux's setpriv."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without util-linux's setpriv: cannot run as an ordinary user")
    return [setpriv, "--bounding-set=-all", "--inh-caps=-all"]


def pid_namespace(unshare: str = "unshare") -> list[str]:
    """`unshare` into a PID namespace of its own, with /proc mounted for it. Not root: through a
    user namespace that maps only the caller's uid, as a rootless container does; the process keeps
    its uid and gets no capability, so the runner under test is an unprivileged one."""
    as_user = [] if os.geteuid() == 0 else ["--user", "--map-current-user"]
    return [unshare, *as_user, "--pid", "--fork", "--mount-proc"]


def cli_token(env: dict[str, str], cwd: Path, user: str, role: str = "admin") -> str:
    """A new API token from the real `codex-runner tokens create` (it prints only the token)."""
    return subprocess.run(
        [CLI, "tokens", "create", "--user", user, "--role", role],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()


def answers_healthz(url: str) -> bool:
    """True once a server at `url` answers /healthz with 200; False while it does not listen yet."""
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def process_alive(pid: int) -> bool:
    """Whether `pid` still runs: not gone, and not a zombie (or dead) its parent has not reaped
    yet. /proc/<pid>/stat of a process that vanishes between the open and the read raises
    ProcessLookupError: that is gone too."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def terminal_manifest(runs_dir: Path, job_id: str) -> dict[str, Any]:
    """A job's manifest once it is terminal. It is published right after the status is written
    (after its file's fsync, docs/execution.md), so a reader that saw the terminal status may be a
    moment early: on a loaded machine the file was not there yet."""
    path = runs_dir / job_id / "manifest.json"

    def terminal() -> bool:
        return path.exists() and json.loads(path.read_text())["status"] not in {"running", "cancel_requested"}

    assert wait_until(terminal, timeout=10), path
    return dict(json.loads(path.read_text()))


class _PromptServer(uvicorn.Server):
    """uvicorn's server as the tests' in-thread one: it stops as soon as asked. Its own looks at
    `should_exit` every 0.1 s and then sleeps 0.1 s more before it waits for its connections, which
    with hundreds of servers a run was over a minute of nothing. Here the stop wakes the main loop
    at once and the shutdown waits for the connections in short steps, in uvicorn's order (stop
    accepting, ask each connection to close, wait for them and their tasks within the graceful
    timeout, then the lifespan's shutdown). Written against uvicorn 0.54 (requirements.lock); the
    real `serve` uses uvicorn's own."""

    _wake: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def stop(self) -> None:
        self.should_exit = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with suppress(RuntimeError):  # the loop has closed: the server has stopped already
                loop.call_soon_threadsafe(wake.set)

    async def main_loop(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.1)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        try:
            await asyncio.wait_for(self._connections_gone(), timeout=self.config.timeout_graceful_shutdown)
        except TimeoutError:
            for task in self.server_state.tasks:
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _connections_gone(self) -> None:
        while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:
            await asyncio.sleep(0.005)
        for server in self.servers:
            await server.wait_closed()


@contextmanager
def serve_app(app: FastAPI) -> Iterator[str]:
    """Runs `app` under uvicorn in a thread on 127.0.0.1; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
    )
    server = _PromptServer(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    if not wait_until(lambda: server.started, timeout=15, interval=0.005):
        server.stop()
        raise RuntimeError("uvicorn did not start in 15 s")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        thread.join(timeout=30)


def make_git_repo(path: Path, files: dict[str, str] | None = None, branch: str = "main") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    env_args = ["-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", "-b", branch, str(path)], check=True)
    for name, text in (files or {"README.md": "hello\n"}).items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    subprocess.run(["git", "-C", str(path), "add", "-A"], check=True)
    subprocess.run(["git", *env_args, "-C", str(path), "commit", "-q", "-m", "initial"], check=True)
    return path


SCRATCH_ECHO_TOML = """
[repos.demo]
source = "{repo}"
workspace = "scratch"

[scripts.echo]
command = ["/bin/echo", "{{message}}"]

[scripts.echo.args.message]
type = "string"
required = true
"""


def write_scratch_echo_config(tmp_path: Path) -> Path:
    """A git repo at tmp_path/repo and a runner.toml with one scratch repo `demo` and one script
    `echo`: the smallest catalog an operations test needs."""
    repo = make_git_repo(tmp_path / "repo")
    (tmp_path / "runner.toml").write_text(SCRATCH_ECHO_TOML.format(repo=repo))
    return repo


TERMINAL = frozenset({"success", "failed", "canceled", "timeout"})


class JobPolling:
    """`job()` and `wait()` for a test harness that has an authenticated `client`."""

    client: httpx.Client
    wait_timeout: float = 30

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.client.get(f"/api/runner/jobs/{job_id}").json())

    def wait(
        self, job_id: str, statuses: frozenset[str] | set[str] = TERMINAL, timeout: float | None = None
    ) -> dict[str, Any]:
        timeout = self.wait_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} still {self.job(job_id)['status']} after {timeout} s")


@contextmanager
def recorded_statements(store: JobStore) -> Iterator[list[str]]:
    """The SQL text of every statement the store runs meanwhile: through `Connection.execute`
    and through `Prepared` (which runs on the DBAPI cursor, so SQLAlchemy's events miss it)."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    originals = {
        name: getattr(Prepared, name) for name in ("execute", "execute_each", "execute_many", "fetch")
    }

    def recording(name: str) -> Any:
        def run(self: Prepared, *args: Any) -> Any:
            seen.append(self.sql)
            return originals[name](self, *args)

        return run

    sa.event.listen(store.engine, "before_cursor_execute", record)
    for name in originals:
        setattr(Prepared, name, recording(name))
    try:
        yield seen
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", record)
        for name, original in originals.items():
            setattr(Prepared, name, original)


class FreezingProxy:
    """A TCP proxy to PostgreSQL on 127.0.0.1; while `frozen`, it accepts connections and reads
    what it is sent but passes nothing on, either way."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self.frozen = False
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.writers: list[asyncio.StreamWriter] = []
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self.loop
        ).result(timeout=10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                while self.frozen:
                    await asyncio.sleep(0.02)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers.append(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def close(self) -> None:
        async def stop() -> None:
            self.frozen = False
            self.server.close()
            for writer in self.writers:
                writer.transport.abort()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            await asyncio.wait(others, timeout=5) if others else None

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def connect_to(url: str, timeout: float) -> socket.socket:
    """A raw TCP connection to an `http://host:port` server, for tests that speak HTTP by hand."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset, which a server that
    closes with unread input sends, ends it too); a socket timeout fails the test."""
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the server neither answered nor closed within {sock.gettimeout()} s: {out[:200]!r}")
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def fail_elsewhere_when_the_script_ends(monkeypatch: pytest.MonkeyPatch, *, stages: bool = False) -> None:
    """Another instance's watchdog fails each job (`heartbeat_stale`, its lease gone) right as its
    script ends: the run is fenced from then on. With `stages`, that write also ends the stages as
    a recovery does (the pending ones skipped)."""
    from codex_runner.execution import job as job_module
    from codex_runner.store.schema import jobs as jobs_table

    real_supervise = job_module.JobRun._supervise

    async def then_failed_elsewhere(self: Any, *args: Any, **kwargs: Any) -> Any:
        outcome = await real_supervise(self, *args, **kwargs)
        values: dict[str, Any] = {"status": "failed", "error_code": "heartbeat_stale", "lease_token": None}
        if stages:
            values["stages"] = [
                {**s, "status": "skipped"} if s["status"] == "pending" else s for s in self.stages.values()
            ]
        with self.rt.engine.begin() as conn:  # another instance's watchdog, meanwhile
            conn.execute(sa.update(jobs_table).where(jobs_table.c.id == self.job_id).values(**values))
        return outcome

    monkeypatch.setattr(job_module.JobRun, "_supervise", then_failed_elsewhere)
