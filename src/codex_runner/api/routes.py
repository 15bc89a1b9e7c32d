"""Routes of SPEC §4 (the log routes live in `api/logs.py`)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from codex_runner.api.auth import JobId, RepoIdFilter, bearer_token, current_principal, require_admin
from codex_runner.api.create import CREATE_PATH, OPENAPI_EXTRA, CreateBatcher, CreateRequest, created_response
from codex_runner.api.errors import error_response, responses
from codex_runner.jobs import Status
from codex_runner.runtime import Runtime
from codex_runner.store import fullness
from codex_runner.store.admin import Principal

router = APIRouter()
#: The routes a `worker` serves too, on RUNNER_WORKER_METRICS_PORT (api/app.py `create_probe_app`).
probe_router = APIRouter()
Auth = Annotated[Principal, Depends(current_principal)]
AUTH_ERRORS = (401, 503)
# A job, as the route's other success answer gives it (FastAPI documents only the default one's body).
JOB_JSON = {"application/json": {"schema": {"type": "object"}}}


def _rt(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


# HEAD too: load balancers often probe with it. One route per method: a route with both methods
# gives both the same operationId, which OpenAPI forbids (FastAPI warns on every /openapi.json).
@probe_router.get("/healthz", tags=["health"])
@probe_router.head("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@probe_router.get("/readyz", tags=["health"], responses=responses(503))
@probe_router.head("/readyz", tags=["health"], responses=responses(503))
async def readyz(request: Request) -> Response:
    runtime = _rt(request)
    # The database's disk full: it answers reads, but refuses every create until a write lands
    # again (`fullness`); a load balancer must send them elsewhere meanwhile.
    if fullness.disk_full(runtime.engine):
        return error_response(503, "not ready", "unavailable")
    # Within a few seconds even when the database accepts connections and never answers (a frozen
    # server, a stuck proxy): a load balancer must hear "not ready", not wait.
    if not await runtime.database_probe().answers():
        return error_response(503, "not ready", "unavailable")
    if any(c.get("blocking") and not c.get("ok") for c in runtime.startup_checks):
        return error_response(503, "not ready", "unavailable")
    return JSONResponse({"status": "ready"})


# FastAPI's own /openapi.json, /docs and /redoc are turned off (api/app.py): they answer without
# auth, and SPEC §4 leaves only the health routes open. The same document is served here, to any
# authenticated caller; the HTML viewers, which fetch it without a token, are not served.
@router.get("/openapi.json", include_in_schema=False)
def openapi_document(request: Request, _: Auth) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/api/runner/repos", tags=["catalog"], responses=responses(*AUTH_ERRORS))
def list_repos(request: Request, _: Auth) -> dict[str, Any]:
    repos = _rt(request).catalog.repos.values()
    return {"items": [r.to_public() for r in repos if r.enabled]}


@router.get("/api/runner/scripts", tags=["catalog"], responses=responses(*AUTH_ERRORS))
def list_scripts(request: Request, _: Auth) -> dict[str, Any]:
    return {"items": [s.to_public() for s in _rt(request).catalog.scripts.values()]}


@router.post(
    CREATE_PATH,
    tags=["jobs"],
    status_code=201,
    responses={
        200: {"description": "idempotent replay of an earlier job", "content": JOB_JSON},
        **responses(400, 401, 403, 409, 413, 429, 503),
    },
    openapi_extra=OPENAPI_EXTRA,
)
async def create_job(request: Request) -> JSONResponse:
    # Served by `CreateEndpoint` ahead of FastAPI (api/create.py); this declaration documents the
    # route and answers the same way where the fast path does not apply (an app under a prefix).
    # No FastAPI dependencies or body parameter: the token is checked here and looked up, and the
    # body validated, in the batch's worker thread (api/create.py), one thread hop for the lot.
    req = CreateRequest(
        token=bearer_token(request),
        body=await request.body(),
        content_type=request.headers.get("content-type"),
        idempotency_key=request.headers.get("idempotency-key"),
    )
    batcher: CreateBatcher = request.app.state.create_batcher
    job, dedup = await batcher.submit(req)
    return created_response(job, dedup)


@router.get("/api/runner/jobs", tags=["jobs"], responses=responses(400, *AUTH_ERRORS))
async def list_jobs(
    request: Request,
    principal: Auth,
    status: Annotated[list[Status] | None, Query()] = None,
    repo_id: RepoIdFilter = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> dict[str, Any]:
    runtime = _rt(request)
    items, total = await asyncio.to_thread(
        runtime.jobs.list_jobs,
        owner=runtime.owner_of(principal),
        statuses=[s.value for s in status or []],
        repo_id=None if repo_id is None else runtime.catalog.filter_repo_id(repo_id),
        limit=limit,
        offset=offset,
    )
    return {"items": items, "total": total, "limit": limit, "offset": offset}


@router.get("/api/runner/jobs/{job_id}", tags=["jobs"], responses=responses(404, *AUTH_ERRORS))
async def get_job(request: Request, job_id: JobId, principal: Auth) -> dict[str, Any]:
    runtime = _rt(request)
    return await asyncio.to_thread(
        runtime.jobs.get, job_id, owner=runtime.owner_of(principal), with_events=True
    )


@router.post(
    "/api/runner/jobs/{job_id}/cancel",
    tags=["jobs"],
    responses={
        202: {"description": "cancel requested", "content": JOB_JSON},
        **responses(404, 409, *AUTH_ERRORS),
    },
)
def cancel_job(request: Request, job_id: JobId, principal: Auth) -> JSONResponse:
    job, code = _rt(request).cancel_job(principal, job_id)
    return JSONResponse(job, status_code=code)


@router.get("/api/runner/jobs/{job_id}/events", tags=["jobs"], responses=responses(404, *AUTH_ERRORS))
def job_events(request: Request, job_id: JobId, principal: Auth) -> dict[str, Any]:
    runtime = _rt(request)
    return {"items": runtime.jobs.events(job_id, owner=runtime.owner_of(principal))}


@router.get("/api/runner/diagnostics", tags=["operations"], responses=responses(403, *AUTH_ERRORS))
def diagnostics(request: Request, principal: Auth) -> dict[str, Any]:
    require_admin(principal)
    from codex_runner.ops.diagnostics import collect

    return collect(_rt(request))


@probe_router.get(
    "/metrics",
    tags=["operations"],
    response_class=PlainTextResponse,
    responses=responses(403, *AUTH_ERRORS),
)
def metrics(request: Request, principal: Auth) -> Response:
    require_admin(principal)
    from codex_runner.ops.metrics import render

    body, content_type = render(_rt(request))
    return Response(body, media_type=content_type)
