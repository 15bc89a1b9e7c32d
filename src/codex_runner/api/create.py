"""POST /api/runner/jobs with group commit.

Concurrent creates queue on the event loop; one batch at a time goes to a worker thread, which
authenticates each request (a token lookup per request, no cache: a revoked token fails on its very
next request), validates it, and creates the valid ones in ONE transaction
(`JobStore.create_many`). A lone request starts its batch at once; the next batch is whatever
queued up meanwhile. So a request costs one thread hop at most, shared with the rest of its batch,
and the database one commit per batch instead of one per job.

`CreateEndpoint` answers the route as a bare ASGI handler, ahead of FastAPI's middleware stack and
router (`RunnerApp` in api/app.py): the busiest route skips nine ASGI layers, the dependency
machinery and a Request object, and answers exactly as the declared FastAPI route in api/routes.py
does (same checks in the same order, same error bodies through `api.errors.response_for`, same
metrics). The declared route stays for the OpenAPI document and for an app mounted under a prefix."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.types import Receive, Scope, Send

from codex_runner.api.auth import authenticate_many, parse_bearer
from codex_runner.api.body import BodyTooLarge, announced_over, read_capped, too_large_response
from codex_runner.api.errors import response_for
from codex_runner.errors import InvalidRequest, NotAuthenticated, RunnerError, StoreUnavailable
from codex_runner.runtime import Runtime
from codex_runner.store.admin import Principal
from codex_runner.store.creates import CreateOutcome
from codex_runner.store.jobs import NewJob

# The most requests one transaction takes; more wait for the next batch.
MAX_BATCH = 256
CREATE_PATH = "/api/runner/jobs"


class CreateJobBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: str | None = Field(default=None, max_length=200)
    repo: str | None = Field(default=None, max_length=200)
    script_key: str = Field(min_length=1, max_length=200)
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_repo(self) -> CreateJobBody:
        if not self.repo_id and not self.repo:
            raise ValueError("give repo_id or repo")
        return self


# The route reads its body itself (after authentication, in the batch's thread), so FastAPI cannot
# infer these: documented by hand.
OPENAPI_EXTRA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": CreateJobBody.model_json_schema()}},
    },
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        }
    ],
}


@dataclass(frozen=True)
class CreateRequest:
    token: str
    body: bytes
    content_type: str | None
    idempotency_key: str | None


def parse_body(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """The body as FastAPI would have validated it: `RequestValidationError` (400) with the same
    `loc`s (`["body", ...]`) otherwise."""
    media = (content_type or "application/json").split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        # Said in terms of the header: `curl -d '{…}'` sends JSON as a form, and FastAPI's own
        # words ("Input should be a valid dictionary…") blamed a body that is one.
        raise InvalidRequest(
            f"the body must be JSON sent as Content-Type: application/json, not {media[:100]!r}",
            errors=[{"loc": ["header", "Content-Type"], "msg": "expected application/json"}],
        )
    if not raw:
        raise _invalid("Field required")
    try:
        return CreateJobBody.model_validate_json(raw).model_dump()
    except ValidationError as exc:
        raise RequestValidationError(
            [
                {"loc": ("body", *err["loc"]), "msg": err["msg"], "type": err["type"]}
                for err in exc.errors(include_url=False)
            ]
        ) from None


def _invalid(msg: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body",), "msg": msg, "type": "value_error"}])


Outcome = CreateOutcome | RequestValidationError


def run_batch(runtime: Runtime, requests: list[CreateRequest]) -> list[Outcome]:
    """Runs in a worker thread: each request's outcome, in order. Checks in the order of the
    single-request path: token, body, Idempotency-Key and catalog, then caps and idempotency."""
    principals: list[Principal | NotAuthenticated] | list[RunnerError]
    try:
        principals = authenticate_many(runtime, [r.token for r in requests])
    except RunnerError as exc:  # StoreUnavailable
        principals = [exc] * len(requests)
    prepared: list[NewJob | Exception] = []
    for req, principal in zip(requests, principals, strict=True):
        try:
            if isinstance(principal, RunnerError):
                raise principal
            body = parse_body(req.body, req.content_type)
            prepared.append(runtime.new_job(principal, body, req.idempotency_key))
        except (RunnerError, RequestValidationError) as exc:
            prepared.append(exc)
    valid = [p for p in prepared if isinstance(p, NewJob)]
    created: list[CreateOutcome]
    try:
        created = runtime.create_jobs(valid) if valid else []
    except Exception as exc:  # e.g. StoreUnavailable: the whole batch's answer, not just one's
        created = [exc] * len(valid)
    answers = iter(created)
    return [next(answers) if isinstance(p, NewJob) else p for p in prepared]


class CreateBatcher:
    """The queue of one event loop's creates, drained one batch at a time."""

    def __init__(self, runtime: Runtime, max_batch: int = MAX_BATCH) -> None:
        self.runtime = runtime
        self.max_batch = max_batch
        self._pending: list[tuple[CreateRequest, asyncio.Future[Outcome]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, request: CreateRequest) -> tuple[dict[str, Any], bool]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._pending.append((request, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        outcome = await future
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            try:
                outcomes = await asyncio.to_thread(run_batch, self.runtime, [r for r, _ in batch])
            except Exception as exc:
                outcomes = [exc] * len(batch)
            except BaseException:
                # Cancelled (shutdown): no request may wait for an answer forever. The thread may
                # still create its batch's jobs; a client that retries with its Idempotency-Key gets them.
                for _, future in batch + self._pending:
                    if not future.done():
                        future.set_exception(StoreUnavailable("the server is shutting down"))
                self._pending.clear()
                raise
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                # A client that went away has cancelled its future; its job stands, as before.
                if not future.done():
                    future.set_result(outcome)


def created_response(job: dict[str, Any], dedup: bool) -> JSONResponse:
    return JSONResponse({**job, "deduplicated": dedup}, status_code=200 if dedup else 201)


class CreateEndpoint:
    """POST /api/runner/jobs as a bare ASGI handler (see the module's docstring)."""

    def __init__(self, runtime: Runtime, batcher: CreateBatcher) -> None:
        self.batcher = batcher
        self.max_bytes = runtime.settings.max_request_bytes
        self.metrics = runtime.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 500  # what HttpMetrics records when no answer went out (the client left)
        try:
            response = await self._answer(scope, receive)
            if response is not None:
                status = response.status_code
                await response(scope, receive, send)
        finally:
            self.metrics.observe_http("POST", CREATE_PATH, status, time.perf_counter() - start)

    async def _answer(self, scope: Scope, receive: Receive) -> JSONResponse | None:
        headers = scope["headers"]
        # The size cap comes first, as BodySizeLimit puts it ahead of every route.
        if announced_over(headers, self.max_bytes):
            return too_large_response(self.max_bytes)
        try:
            body = await read_capped(receive, self.max_bytes)
        except BodyTooLarge:
            return too_large_response(self.max_bytes)
        if not isinstance(body, bytes):
            return None  # disconnected before the body was complete: nobody to answer
        authorization = content_type = idempotency_key = None
        for name, value in headers:
            # As Starlette's `Headers.get`: the first of repeated headers, decoded as latin-1.
            if name == b"authorization":
                authorization = authorization if authorization is not None else value.decode("latin-1")
            elif name == b"content-type":
                content_type = content_type if content_type is not None else value.decode("latin-1")
            elif name == b"idempotency-key":
                idempotency_key = idempotency_key if idempotency_key is not None else value.decode("latin-1")
        try:
            request = CreateRequest(parse_bearer(authorization), body, content_type, idempotency_key)
            job, dedup = await self.batcher.submit(request)
        except Exception as exc:
            return response_for(exc)
        return created_response(job, dedup)
