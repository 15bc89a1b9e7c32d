"""`serve` (API + launcher) and `worker` (launcher only) process entry points."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from types import FrameType

import structlog
import uvicorn
from fastapi import FastAPI

from codex_runner import __version__
from codex_runner.api import create_app
from codex_runner.api.connection import protocol_class
from codex_runner.config import Settings
from codex_runner.errors import ConfigError
from codex_runner.launcher import guard_serve_signals
from codex_runner.ops.fdlimit import raise_fd_limit
from codex_runner.ops.hardening import seal_process
from codex_runner.ops.service import background_chores, on_startup
from codex_runner.runtime import Runtime
from codex_runner.store.instances import InstanceRegistry

log = structlog.get_logger("codex_runner.server")


def build_app(runtime: Runtime, *, chores: bool = False) -> FastAPI:
    """The API with the launcher (when `RUNNER_ENABLED`) and, with `chores`, retention running in
    its lifespan."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        launcher = None
        presence: ApiPresence | None = None
        chores_task = asyncio.create_task(background_chores(runtime)) if chores else None
        if runtime.settings.enabled:
            from codex_runner.launcher import Launcher

            launcher = Launcher(runtime)
            await launcher.start()
        else:
            presence = ApiPresence(runtime)
            await presence.start()
        try:
            yield
        finally:
            if launcher is not None:
                await launcher.stop()
            if presence is not None:
                await presence.stop()
            if chores_task is not None:
                chores_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await chores_task

    return create_app(runtime, lifespan=lifespan)


class ApiPresence:
    """An API-only `serve` (`RUNNER_ENABLED=false`) has no launcher to register it, yet it writes
    to the database: `restore` must see it live and refuse. It heartbeats an instance row of its own,
    `<RUNNER_ID>:api:<host>:<pid>` (never a launcher's id, so no duplicate check and no recovery
    concern it), and deletes it when it stops. It also runs the watchdog every instance runs
    (docs/crash-safety.md): with the API apart from the workers, a dead worker's jobs would
    otherwise stay `running` until some other worker starts."""

    def __init__(self, runtime: Runtime) -> None:
        from codex_runner.launcher import Launcher

        settings = runtime.settings
        self.registry = InstanceRegistry(
            runtime.engine, f"{settings.id}:api:{socket.gethostname()}:{os.getpid()}"
        )
        self.period = settings.heartbeat_seconds
        self._task: asyncio.Task[None] | None = None
        self._watcher = Launcher(runtime)  # never started: its watchdog alone, it claims nothing
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with contextlib.suppress(Exception):  # presence is for `restore`: never worth failing the API
            await asyncio.to_thread(self.registry.register)
        self._task = asyncio.create_task(self._beat(), name="api-presence")
        self._watch = asyncio.create_task(self._watcher.watchdog_forever(), name="watchdog")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.registry.heartbeat)

    async def stop(self) -> None:
        for task in (self._task, self._watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.registry.forget)


def tune_gc() -> None:
    """Moves what start-up made (modules, the app, the catalog) out of the collector's reach and
    collects the young generation less often: each request or job makes thousands of short-lived
    objects, and frequent collections walking the long-lived heap cost about 0.3 ms of CPU per
    create (1.8 → 1.5 ms, bench/api_create.py). Reference cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 50)


def _refuse_duplicate(runtime: Runtime) -> None:
    """Before anything starts: a second live instance under one RUNNER_ID would have its recovery
    kill the first one's jobs (docs/crash-safety.md)."""
    if runtime.settings.enabled:
        InstanceRegistry(runtime.engine, runtime.settings.id).check_free(runtime.settings.stale_after_seconds)


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_problem(host: str, port: int, exc: OSError, port_setting: str) -> str:
    where = _where(host, port)
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{port_setting}={port}: cannot listen on {where}, the address is already in use (another "
            f"process listens there): stop it or choose another {port_setting}"
        )
    if exc.errno == errno.EACCES:
        return f"{port_setting}={port}: cannot listen on {where}: permission denied (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"RUNNER_HOST={host}: cannot listen on {where}: not an address of this machine"
    return f"RUNNER_HOST={host}, {port_setting}={port}: cannot listen on {where}: {exc.strerror or exc}"


def bind_listeners(host: str, port: int, port_setting: str = "RUNNER_PORT") -> list[socket.socket]:
    """The listening addresses of `serve`, bound before anything starts. uvicorn binds only after
    the app's lifespan has run, and that starts the launcher, which claims queued jobs: a port in
    use, or a host name that does not resolve, used to fail them (`runner_shutdown`) and exit 3
    with no line naming the setting. Every address `host` resolves to is bound, as uvicorn did
    (asyncio's `create_server`): IPv6 sockets IPv6 only, an address family the host lacks skipped.
    Raises `ConfigError` naming RUNNER_HOST or `port_setting`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"RUNNER_HOST={host}: cannot resolve this host name ({exc.strerror})") from None
    sockets: list[socket.socket] = []
    skipped: OSError | None = None
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise
                # An address family not enabled here (IPv6 in many containers), as asyncio does.
                skipped = exc
                sockets.pop().close()
                continue
            # Listening at once: with SO_REUSEADDR two processes may both bind a port that neither
            # listens on yet, and the second found out only once its launcher had started.
            sock.listen(2048)
        if not sockets:
            raise skipped or OSError(errno.EADDRNOTAVAIL, "no address to listen on")
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ConfigError(_bind_problem(host, port, exc, port_setting)) from None
    return sockets


def run_serve(settings: Settings) -> None:
    runtime = Runtime.open(settings)
    sockets: list[socket.socket] = []
    try:
        _refuse_duplicate(runtime)
        # Before the app, whose lifespan starts the launcher: see `bind_listeners`.
        sockets = bind_listeners(settings.host, settings.port)
        on_startup(runtime)
        # Before the launcher starts a job, whose scripts must not read our secrets; after
        # on_startup, which sets up the log it may warn in (ops/hardening.py).
        seal_process()
        raise_fd_limit(settings)  # after on_startup, which sets up the log it writes to
        config = uvicorn.Config(
            build_app(runtime, chores=True),
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            # uvloop: 8% less CPU per create than asyncio's loop. Jobs no longer spawn through the
            # loop (subprocess.Popen, which vforks, and a pidfd: execution/process.py), so uvloop's
            # fork-per-child no longer matters (docs/performance.md, Dispatch).
            loop="uvloop",
            # httptools with a cap on a request's head and a time limit on a request's arrival
            # (api/connection.py).
            http=protocol_class(
                settings.http_request_timeout_seconds, settings.http_max_connections, runtime.metrics
            ),
            # The API has no websocket, and an upgraded connection would leave the protocol that
            # counts it (api/connection.py).
            ws="none",
            timeout_graceful_shutdown=settings.kill_grace_seconds + 5,
        )
        # Read now: once uvicorn has them, uvloop owns the sockets (a `getsockname` then fails).
        server = _Server(config, settings, sockets[0].getsockname()[1])
        tune_gc()
        # A second SIGTERM/SIGINT exits at once but still kills every job's process group.
        guard_serve_signals(server)
        # uvicorn raises the signal it shut down for again once it is done, for the handler it
        # found: the default one would kill the process (status 143) before `runtime.close()`.
        # The shutdown is over by then, so ours has nothing left to do: `serve` exits 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _already_shut_down)
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
        runtime.close()


class _Server(uvicorn.Server):
    """uvicorn's server, saying `serving` in the service log once the app has started (the
    launcher with it) and listens: the JSON log stays JSON lines, and a start that fails
    earlier never announces it."""

    def __init__(self, config: uvicorn.Config, settings: Settings, port: int) -> None:
        super().__init__(config)
        self.settings = settings
        self.port = port

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            log.info(
                "serving",
                url=f"http://{_where(self.settings.host, self.port)}",
                version=__version__,
                launcher=self.settings.enabled,
            )


def _already_shut_down(sig: int, frame: FrameType | None) -> None:
    return None


def run_worker(settings: Settings) -> None:
    if not settings.enabled:
        # A worker is nothing but a launcher: it ran one anyway, and claimed jobs.
        raise ConfigError(
            "RUNNER_ENABLED=false: this instance launches nothing, and a worker is only a launcher; "
            "unset it (or set it to true) to run a worker, or run `serve` for the API alone"
        )
    runtime = Runtime.open(settings)
    sockets: list[socket.socket] = []
    try:
        _refuse_duplicate(runtime)
        if settings.worker_metrics_port:
            # Before the launcher, as `serve` does: a port in use must not cost a claimed job.
            sockets = bind_listeners(
                settings.host, settings.worker_metrics_port, "RUNNER_WORKER_METRICS_PORT"
            )
        on_startup(runtime)
        seal_process()  # as `serve` does
        if settings.worker_metrics_port:
            raise_fd_limit(settings)
        tune_gc()
        asyncio.run(_worker_main(runtime, sockets))
    finally:
        for sock in sockets:
            sock.close()
        runtime.close()


async def _worker_main(runtime: Runtime, sockets: list[socket.socket]) -> None:
    from codex_runner.launcher import run_worker_forever

    if not sockets:
        await run_worker_forever(runtime)
        return
    from codex_runner.api.app import create_probe_app

    config = uvicorn.Config(
        create_probe_app(runtime),
        log_config=None,
        access_log=False,
        lifespan="off",
        http=protocol_class(
            runtime.settings.http_request_timeout_seconds,
            runtime.settings.http_max_connections,
            runtime.metrics,
        ),
        ws="none",
        timeout_graceful_shutdown=5,
    )
    server = _ProbeServer(config, runtime.settings.host, sockets[0].getsockname()[1])
    serving = asyncio.create_task(server.serve(sockets=sockets), name="worker-metrics")
    serving.add_done_callback(server.on_done)
    try:
        await run_worker_forever(runtime)
    finally:
        # After the launcher has stopped: a scrape during the shutdown still answers.
        server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(serving, timeout=10)


class _ProbeServer(uvicorn.Server):
    """uvicorn inside a worker's own loop. It must leave SIGTERM and SIGINT to the worker
    (launcher.run_worker_forever): uvicorn would take them over for itself while it serves, and the
    worker would never hear that it should stop. A server that stops on its own (it should not)
    leaves the worker running, without metrics, and says so."""

    def __init__(self, config: uvicorn.Config, host: str, port: int) -> None:
        super().__init__(config)
        self.where = f"http://{_where(host, port)}"

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            log.info("worker_metrics_serving", url=self.where, routes=["/healthz", "/readyz", "/metrics"])

    def on_done(self, task: asyncio.Task[None]) -> None:
        if self.should_exit:
            return
        failure = None if task.cancelled() else task.exception()
        log.warning(
            "worker_metrics_stopped", url=self.where, error=type(failure).__name__ if failure else None
        )
