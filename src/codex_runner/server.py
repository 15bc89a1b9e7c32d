"""`serve` (API + launcher) and `worker` (launcher only) process entry points."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from codex_runner.api import create_app
from codex_runner.config import Settings
from codex_runner.runtime import Runtime


def build_app(runtime: Runtime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        launcher = None
        if runtime.settings.enabled:
            from codex_runner.launcher import Launcher

            launcher = Launcher(runtime)
            await launcher.start()
        try:
            yield
        finally:
            if launcher is not None:
                await launcher.stop()

    return create_app(runtime, lifespan=lifespan)


def run_serve(settings: Settings) -> None:
    runtime = Runtime.open(settings)
    try:
        config = uvicorn.Config(
            build_app(runtime),
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=settings.kill_grace_seconds + 5,
        )
        uvicorn.Server(config).run()
    finally:
        runtime.close()


def run_worker(settings: Settings) -> None:
    from codex_runner.launcher import run_worker_forever

    runtime = Runtime.open(settings)
    try:
        asyncio.run(run_worker_forever(runtime))
    finally:
        runtime.close()
