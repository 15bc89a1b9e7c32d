"""The FastAPI application: middleware, error mapping and routers."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from codex_runner import __version__
from codex_runner.api import errors, logs, openapi, routes
from codex_runner.api.body import BodyTooLarge, announced_over, read_capped, too_large_response
from codex_runner.api.create import CREATE_PATH, CreateBatcher, CreateEndpoint
from codex_runner.runtime import Runtime


class BodySizeLimit:
    """Answers 413 for bodies over the cap, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if announced_over(scope.get("headers", []), self.max_bytes):
            await self._reject(scope, receive, send)
            return
        # Read the body up front (it is small by definition) so an oversized streamed body is
        # refused with 413 before any route sees it, rather than surfacing as a parse error.
        try:
            body = await read_capped(receive, self.max_bytes)
        except BodyTooLarge:
            await self._reject(scope, receive, send)
            return
        if not isinstance(body, bytes):  # the client left: the route sees the disconnect
            await self.app(scope, _replay(body, receive), send)
            return
        await self.app(
            scope, _replay({"type": "http.request", "body": body, "more_body": False}, receive), send
        )

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        await too_large_response(self.max_bytes)(scope, receive, send)


class HttpMetrics:
    """Counts requests and times them by route template (`/api/runner/jobs/{job_id}`), never by
    raw path, so label cardinality stays bounded whatever clients send."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.metrics = runtime.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.observe_http(method, template, status, time.perf_counter() - start)


class ErrorGuard:
    """The outermost layer: an exception that got this far (Starlette's ServerErrorMiddleware has
    answered it and re-raises it "so servers can log it") ends here, logged by type only, with the
    SPEC's 500 body if no answer started. Re-raised, uvicorn would log "Exception in ASGI
    application" with the traceback, whose text can carry a secret."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            errors.log_unexpected(exc)
            if not started:
                # The client may be gone: nothing is left to tell it, and nothing to log.
                with contextlib.suppress(Exception):
                    await errors.internal_error_response()(scope, receive, send)


def _replay(first: Message, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return first
        return await receive()

    return replay


class RunnerApp(FastAPI):
    """FastAPI, with `POST /api/runner/jobs` answered by `fast_create` before the middleware stack
    (api/create.py says why and how it stays the same route). None sends it the usual way."""

    fast_create: CreateEndpoint | None = None

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document, corrected to what the service answers (api/openapi.py)."""
        if self.openapi_schema is None:
            self.openapi_schema = openapi.finish(super().openapi())
        return self.openapi_schema

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await ErrorGuard(self._dispatch)(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.fast_create
        if (
            fast is not None
            and scope["type"] == "http"
            and scope["path"] == CREATE_PATH
            and scope["method"] == "POST"
        ):
            await fast(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_app(runtime: Runtime, *, lifespan: Lifespan | None = None) -> RunnerApp:
    app = _app(
        runtime,
        title="codex-runner",
        description="Runs AI coding agents as durable jobs against git repositories.",
        lifespan=lifespan,
    )
    app.state.create_batcher = CreateBatcher(runtime)
    app.fast_create = CreateEndpoint(runtime, app.state.create_batcher)
    app.include_router(routes.router)
    app.include_router(logs.router)
    _add_middleware(app, runtime)
    return app


def create_probe_app(runtime: Runtime) -> RunnerApp:
    """What a `worker` serves with RUNNER_WORKER_METRICS_PORT: `/healthz`, `/readyz` and
    `/metrics` (admin token), the same routes as `serve`'s, with the same auth, errors and request
    metrics. A worker's job counters live in its own process, so without this they were nowhere to
    be read (docs/operations.md, "Metrics")."""
    app = _app(runtime, title="codex-runner worker")
    _add_middleware(app, runtime)
    return app


def _app(
    runtime: Runtime, *, title: str, description: str = "", lifespan: Lifespan | None = None
) -> RunnerApp:
    """The app with the health and metrics routes and the error mapping: what `serve` and a
    worker's port share."""
    app = RunnerApp(
        title=title,
        version=__version__,
        description=description,
        lifespan=lifespan,
        # Served by an authenticated route instead (api/routes.py `openapi_document`).
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        # A path with a trailing slash is no route (404, api/errors.py), not Starlette's empty 307
        # to the same path without it, a URL it builds from the request's Host header.
        redirect_slashes=False,
    )
    app.state.runtime = runtime
    errors.install(app)
    app.include_router(routes.probe_router)
    return app


def _add_middleware(app: RunnerApp, runtime: Runtime) -> None:
    app.add_middleware(BodySizeLimit, max_bytes=runtime.settings.max_request_bytes)
    app.add_middleware(HttpMetrics, runtime=runtime)
