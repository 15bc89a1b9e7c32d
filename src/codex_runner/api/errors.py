"""Maps error types to HTTP in one place. Every error body is `{"detail", "code"}`; no 500 ever
carries a stack trace or a secret."""

from __future__ import annotations

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from codex_runner import errors as e

log = structlog.get_logger("codex_runner.api")

STATUS_BY_TYPE: list[tuple[type[e.RunnerError], int]] = [
    (e.InvalidRequest, 400),
    (e.NotAuthenticated, 401),
    (e.Forbidden, 403),
    (e.NotFound, 404),
    (e.InvalidTransition, 409),
    (e.IdempotencyConflict, 409),
    (e.LogNotHere, 409),
    (e.TooManyRequests, 429),
    (e.StoreUnavailable, 503),
    (e.CryptoError, 400),
]

CODE_BY_STATUS = {
    400: "invalid_request",
    401: "not_authenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "invalid_transition",
    413: "payload_too_large",
    429: "queue_full",
    503: "unavailable",
}


class ErrorBody(BaseModel):
    detail: str
    code: str


class ValidationErrorItem(BaseModel):
    loc: list[str | int]
    msg: str


class ValidationErrorBody(ErrorBody):
    errors: list[ValidationErrorItem] = []


def error_response(status: int, detail: str, code: str, **extra: object) -> JSONResponse:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"detail": detail, "code": code, **extra}, status_code=status, headers=headers)


def status_for(exc: e.RunnerError) -> int:
    for cls, status in STATUS_BY_TYPE:
        if isinstance(exc, cls):
            return status
    return 500


def runner_error_response(exc: e.RunnerError) -> JSONResponse:
    status = status_for(exc)
    if status == 500:
        # A runner error no client can act on (a lost lease, a configuration error): the SPEC's
        # 500 and one `unhandled_error` line naming its type, like any other unexpected error.
        return unexpected_error_response(exc)
    extra: dict[str, object] = {}
    if isinstance(exc, e.InvalidRequest) and exc.errors:
        extra["errors"] = exc.errors
    response = error_response(status, exc.message, exc.code, **extra)
    if isinstance(exc, e.TooManyRequests):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


#: How many problems a validation error's `errors` names; the rest are counted (as the unknown
#: arguments of a create are, catalog/specs.py).
MAX_ERRORS_LISTED = 20


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    items: list[dict[str, object]] = [
        {
            "loc": [str(p) if not isinstance(p, int) else p for p in err.get("loc", ())],
            "msg": str(err.get("msg")),
        }
        for err in problems[:MAX_ERRORS_LISTED]
    ]
    if len(problems) > MAX_ERRORS_LISTED:
        # A body of thousands of unknown fields must not make an answer larger than itself: each
        # listed took some 60 bytes for the 8 or so of its field.
        where = [str(p) for p in problems[MAX_ERRORS_LISTED].get("loc", ())[:1]]  # "body", "query"
        items.append({"loc": where, "msg": f"and {len(problems) - MAX_ERRORS_LISTED} more errors"})
    return error_response(400, "the request is not valid", "invalid_request", errors=items)


def internal_error_response() -> JSONResponse:
    return error_response(500, "internal error", "internal_error")


def log_unexpected(exc: BaseException) -> None:
    # Log the type only: an exception's text (or a traceback's) can carry a URL with credentials
    # or a secret.
    log.error("unhandled_error", error_type=type(exc).__name__)


def unexpected_error_response(exc: BaseException) -> JSONResponse:
    log_unexpected(exc)
    return internal_error_response()


def response_for(exc: Exception) -> JSONResponse:
    """The answer to any exception, as the handlers `install` registers give it; for code that
    answers outside FastAPI's exception handling (the create fast path, api/create.py)."""
    if isinstance(exc, e.RunnerError):
        return runner_error_response(exc)
    if isinstance(exc, RequestValidationError):
        return validation_error_response(exc)
    return unexpected_error_response(exc)


# The methods a 405's `Allow` may name: the standard ones a route here could declare.
_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> str:
    """Every method the path answers, for a 405's `Allow`. Starlette names only those of the first
    route whose path matched: `Allow: POST` for `/api/runner/jobs`, which answers GET too, and
    `Allow: HEAD` for `/healthz` (one route per method there, api/routes.py says why). Each method
    is tried against the routes as the router would (FastAPI nests included routers)."""
    routes = request.app.router.routes
    return ", ".join(
        m for m in _METHODS if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes)
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(e.RunnerError)
    async def _runner_error(_: Request, exc: e.RunnerError) -> JSONResponse:
        return runner_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = CODE_BY_STATUS.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and detail == "Not Found":
            # The router's: no route serves this path. Said as such, or it reads like a missing job
            # to a client whose base URL (a proxy's prefix) is wrong.
            detail = f"no route {request.method} {request.url.path[:200]}"
        response = error_response(exc.status_code, detail, code)
        # Starlette's own headers: the `Allow` a 405 must carry (RFC 9110).
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = allowed_methods(request)
        return response

    # Starlette's ServerErrorMiddleware sends this answer and then re-raises the exception;
    # `ErrorGuard` (outside it) stops it there and logs it once, so no logging here.
    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return internal_error_response()


def responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI documentation of the error answers a route can give."""
    out: dict[int | str, dict[str, object]] = {}
    for status in statuses:
        model = ValidationErrorBody if status == 400 else ErrorBody
        out[status] = {"model": model, "description": CODE_BY_STATUS.get(status, "error")}
    return out
