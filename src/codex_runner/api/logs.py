"""Log routes (SPEC §5): byte-exact pages of the redacted log, and Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Header, Query, Request
from sse_starlette.sse import EventSourceResponse, SendTimeoutError
from starlette.types import Receive, Scope, Send

from codex_runner.api.auth import JobId, authenticate, bearer_token, current_principal
from codex_runner.api.errors import responses
from codex_runner.errors import InvalidRequest, LogNotHere, NotAuthenticated, TooManyStreams
from codex_runner.jobs import TERMINAL, Status
from codex_runner.logs import read_page
from codex_runner.logs.location import writes_here
from codex_runner.runtime import Runtime
from codex_runner.store.admin import Principal

log = structlog.get_logger("codex_runner.api")
router = APIRouter(tags=["logs"])
Auth = Annotated[Principal, Depends(current_principal)]
MAX_LIMIT = 131072
STREAM_CHUNK = 65536
# How often a live stream looks for new output: the bound on line-to-client latency when idle.
STREAM_POLL_SECONDS = 0.05
# How often an idle stream (its log not growing) asks the database whether the job ended: a status
# read per stream every poll made a few hundred idle streams a load on the database. A job's
# last log line comes before its terminal status, so a growing log is re-read at once.
STATUS_POLL_SECONDS = 0.25
# How often an open stream checks its token again (one indexed read).
AUTH_RECHECK_SECONDS = 1.0
KEEPALIVE_SECONDS = 15
#: How long one send to a stream's client may wait for room in the connection: a client that stops
#: reading (its buffers full) is dropped then, with its place (`StreamSlot`), instead of holding
#: both, and its token's recheck, for ever.
SEND_TIMEOUT_SECONDS = 60.0
# Event ids are redacted offsets: 20 digits exceed any log (and a 64-bit integer).
MAX_EVENT_ID_DIGITS = 20
#: The largest `offset` taken: one whose event id a resume would take back.
MAX_OFFSET = 10**MAX_EVENT_ID_DIGITS - 1


def log_paths(runtime: Runtime, job_id: str) -> tuple[Path, Path]:
    settings = runtime.settings
    return settings.log_dir / f"{job_id}.log", settings.data_dir / "log-index"


def _size(path: Path) -> int:
    """The log file's size (-1 while it does not exist): a stat on the loop, cheaper than the
    thread trip it saves."""
    try:
        return path.stat().st_size
    except OSError:
        return -1


class StreamSlot:
    """One of a user's RUNNER_MAX_STREAMS_PER_USER open log streams on this instance. Each costs
    a connection, a file descriptor and several thread trips a second (status, token, log reads,
    in the pool the launcher shares): one user's hundreds of followers slowed every other request
    to seconds. Taken in the route, with no await between the check and the count (one loop: no
    two requests interleave there); given back when the stream ends, or, for a response that never
    started streaming (the client left first), when it is dropped."""

    def __init__(self, runtime: Runtime, user: str) -> None:
        counts = runtime.open_streams
        limit = runtime.settings.max_streams_per_user
        if counts.get(user, 0) >= limit:
            raise TooManyStreams(
                f"{limit} log streams are open for this user already (RUNNER_MAX_STREAMS_PER_USER): "
                "close one, or read pages with GET .../logs",
                retry_after=5,
            )
        counts[user] = counts.get(user, 0) + 1
        self._release = weakref.finalize(self, _give_back, counts, user)

    def release(self) -> None:
        self._release()


def _give_back(counts: dict[str, int], user: str) -> None:
    left = counts.get(user, 1) - 1
    if left > 0:
        counts[user] = left
    else:
        counts.pop(user, None)


def _status(runtime: Runtime, job_id: str, owner: str | None, log_path: Path) -> Status:
    """The job's status, or `LogNotHere` when an instance that writes its logs into another folder
    than this one's ran it: its log is not missing but elsewhere, and must not read as empty and
    complete. A missing log of an instance that writes here (`writes_here`) is one not opened yet
    (a claim, a prepare under way)."""
    row = runtime.jobs.get(job_id, owner=owner)
    runner_id = row["runner_id"]
    if (
        runner_id
        and runner_id != runtime.settings.id
        and not log_path.exists()
        and not writes_here(log_path.parent, runner_id)
    ):
        raise LogNotHere(
            f"the log of job {job_id} is in the log folder (RUNNER_LOG_DIR) of runner instance "
            f"{runner_id!r}, which this instance does not share (another host or data folder): "
            "read it through an instance that runs with that folder"
        )
    return Status(row["status"])


def resume_offset(last_event_id: str | None) -> int | None:
    """The offset a `Last-Event-ID` header resumes from: the `id` of an event this route sent, so
    1-20 ASCII digits. Absent or blank: none (the `offset` parameter applies). Anything else is a
    400, as a bad `offset` is: `str.isdigit` would let Unicode digits ("²") through to `int()`,
    and thousands of digits make `int()` fail."""
    if last_event_id is None or not last_event_id.strip(" \t"):
        return None
    text = last_event_id.strip(" \t")
    if len(text) > MAX_EVENT_ID_DIGITS or not (text.isascii() and text.isdigit()):
        raise InvalidRequest(
            f"Last-Event-ID must be a log offset of 1-{MAX_EVENT_ID_DIGITS} ASCII digits",
            errors=[
                {"loc": ["header", "Last-Event-ID"], "msg": f"expected 1-{MAX_EVENT_ID_DIGITS} ASCII digits"}
            ],
        )
    return int(text)


@router.get("/api/runner/jobs/{job_id}/logs", responses=responses(400, 404, 409, 401, 503))
def get_logs(
    request: Request,
    job_id: JobId,
    principal: Auth,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 16384,
) -> dict[str, Any]:
    runtime: Runtime = request.app.state.runtime
    # Read the status before the file: a terminal status means the writer has closed the log.
    log_path, index_dir = log_paths(runtime, job_id)
    status = _status(runtime, job_id, runtime.owner_of(principal), log_path)
    page = read_page(log_path, offset=offset, limit=limit, complete=status in TERMINAL, index_dir=index_dir)
    return {
        "job_id": job_id,
        "offset": page.offset,
        "next_offset": page.next_offset,
        "is_complete": page.is_complete,
        "content": page.content,
        "redaction_version": page.redaction_version,
    }


@router.get(
    "/api/runner/jobs/{job_id}/logs/stream",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "Server-Sent Events: `log` events, then one `end` with the job's status",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **responses(400, 404, 409, 401, 429, 503),
    },
)
async def stream_logs(
    request: Request,
    job_id: JobId,
    principal: Auth,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventSourceResponse:
    runtime: Runtime = request.app.state.runtime
    owner = runtime.owner_of(principal)
    resume = resume_offset(last_event_id)
    if resume is not None:
        offset = resume
    log_path, index_dir = log_paths(runtime, job_id)
    # 404 (or 409 `log_not_here`) before the stream starts.
    await asyncio.to_thread(_status, runtime, job_id, owner, log_path)
    token = bearer_token(request)
    slot = StreamSlot(runtime, principal.user)

    async def still_allowed() -> bool:
        """The token is checked again as the stream goes on: a revoked one (or an expired JWT)
        "stops working at once" (docs/api.md), an open stream included."""
        try:
            await asyncio.to_thread(authenticate, runtime, token)
        except NotAuthenticated:
            return False
        return True

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            async for event in _events():
                yield event
        finally:
            slot.release()

    async def _events() -> AsyncIterator[dict[str, str]]:
        loop = asyncio.get_running_loop()
        position = offset
        read_size, status_at, auth_at = -1, 0.0, loop.time()
        while True:
            if loop.time() - auth_at >= AUTH_RECHECK_SECONDS:
                if not await still_allowed():
                    return
                auth_at = loop.time()
            size = _size(log_path)
            if size == read_size and loop.time() - status_at < STATUS_POLL_SECONDS:
                # Nothing new since the last read (which found nothing to send) and the status
                # read lately: no thread trip, no query.
                if await request.is_disconnected():
                    return
                await asyncio.sleep(STREAM_POLL_SECONDS)
                continue
            try:
                status = await asyncio.to_thread(_status, runtime, job_id, owner, log_path)
            except LogNotHere:
                # Claimed meanwhile by an instance whose log folder is another: the stream ends
                # without `end`, and the client's reconnect gets the 409.
                return
            status_at = loop.time()
            complete = status in TERMINAL
            page = await asyncio.to_thread(
                read_page,
                log_path,
                offset=position,
                limit=STREAM_CHUNK,
                complete=complete,
                index_dir=index_dir,
            )
            if page.content:
                data = {"offset": page.offset, "next_offset": page.next_offset, "content": page.content}
                yield {"event": "log", "id": str(page.next_offset), "data": json.dumps(data)}
                position, read_size = page.next_offset, -1  # read on: there may be more
                continue
            read_size = size  # all of it read: what a later read could add must grow the file
            position = max(position, page.next_offset)
            if complete and page.is_complete:
                yield {"event": "end", "id": str(position), "data": json.dumps({"status": status.value})}
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(STREAM_POLL_SECONDS)

    return _LogStream(events(), ping=KEEPALIVE_SECONDS, send_timeout=SEND_TIMEOUT_SECONDS)


class _LogStream(EventSourceResponse):
    """A client that stopped reading is dropped (`SEND_TIMEOUT_SECONDS`): an expected end, not the
    `unhandled_error` the error guard would log for an exception out of a started answer."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.info("log_stream_dropped", reason="client_not_reading", seconds=self.send_timeout)
