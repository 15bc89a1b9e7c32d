"""`serve` (API + launcher) and `worker` (launcher only) process entry points."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI

from codex_runner.api import create_app
from codex_runner.config import Settings
from codex_runner.errors import ConfigError
from codex_runner.launcher import guard_serve_signals
from codex_runner.ops.service import background_chores, on_startup
from codex_runner.runtime import Runtime
from codex_runner.store.instances import InstanceRegistry


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
    concern it), and deletes it when it stops."""

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        self.registry = InstanceRegistry(
            runtime.engine, f"{settings.id}:api:{socket.gethostname()}:{os.getpid()}"
        )
        self.period = settings.heartbeat_seconds
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with contextlib.suppress(Exception):  # presence is for `restore`: never worth failing the API
            await asyncio.to_thread(self.registry.register)
        self._task = asyncio.create_task(self._beat(), name="api-presence")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.registry.heartbeat)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
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


def run_serve(settings: Settings) -> None:
    runtime = Runtime.open(settings)
    try:
        _refuse_duplicate(runtime)
        on_startup(runtime)
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
            timeout_graceful_shutdown=settings.kill_grace_seconds + 5,
        )
        server = uvicorn.Server(config)
        tune_gc()
        # A second SIGTERM/SIGINT exits at once but still kills every job's process group.
        guard_serve_signals(server)
        # uvicorn raises the signal it shut down for again once it is done, for the handler it
        # found: the default one would kill the process (status 143) before `runtime.close()`.
        # The shutdown is over by then, so ours has nothing left to do: `serve` exits 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _already_shut_down)
        server.run()
    finally:
        runtime.close()


def _already_shut_down(sig: int, frame: FrameType | None) -> None:
    return None


def run_worker(settings: Settings) -> None:
    from codex_runner.launcher import run_worker_forever

    if not settings.enabled:
        # A worker is nothing but a launcher: it ran one anyway, and claimed jobs.
        raise ConfigError(
            "RUNNER_ENABLED=false: this instance launches nothing, and a worker is only a launcher; "
            "unset it (or set it to true) to run a worker, or run `serve` for the API alone"
        )
    runtime = Runtime.open(settings)
    try:
        _refuse_duplicate(runtime)
        on_startup(runtime)
        tune_gc()
        asyncio.run(run_worker_forever(runtime))
    finally:
        runtime.close()
