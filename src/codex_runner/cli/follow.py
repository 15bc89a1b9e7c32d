"""Waiting for a job and following its log, shared by `submit --wait/--follow` and `jobs logs`.

`LogFollower` is the one place that knows how log bytes arrive: `chunks()` reads pages of
`GET /jobs/{id}/logs` (what exists now), `stream()` follows `GET /jobs/{id}/logs/stream`, the
Server-Sent Events route (SPEC §5), until its `end` event, reconnecting with `Last-Event-ID` when
the connection drops.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import quote

import httpx

from codex_runner.cli.client import RunnerBusy, RunnerClient, RunnerUnreachable, patiently
from codex_runner.cli.common import CliError, ExitCode

TERMINAL = frozenset({"success", "failed", "canceled", "timeout"})
EXIT_BY_STATUS = {
    "success": ExitCode.OK,
    "failed": ExitCode.JOB_FAILED,
    "timeout": ExitCode.JOB_TIMEOUT,
    "canceled": ExitCode.JOB_CANCELED,
}
STATUS_POLL_SECONDS = 0.25
LOG_POLL_SECONDS = 0.5
LOG_PAGE_BYTES = 65536
# The server sends a keep-alive comment every 15 s: three missed ones mean the connection is dead.
STREAM_READ_TIMEOUT_SECONDS = 45.0
STREAM_CONNECT_TIMEOUT_SECONDS = 10.0
# Reconnects in a row without receiving an event, and the pause before each: about 30 s in all,
# enough to ride out a runner restart.
RECONNECT_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0)
# A `Retry-After` longer than this is not waited in full before the next reconnect.
MAX_RETRY_AFTER_SECONDS = 30.0


def jobs_path(job_id: str, *rest: str) -> str:
    # Job ids come from argv: keep them one path segment, whatever they contain.
    return "/".join(["/api/runner/jobs", quote(job_id, safe=""), *rest])


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str
    id: str | None


_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass
class SseDecoder:
    """The event-stream format (WHATWG HTML §9.2.6), fed bytes as they arrive: lines end with CRLF,
    LF or CR; `:` starts a comment (the keep-alives); a blank line dispatches the event."""

    _buffer: bytes = b""
    _skip_lf: bool = False  # the last chunk ended with CR: a LF opening the next one is its pair
    _event: str = ""
    _data: list[str] = field(default_factory=list)
    last_id: str | None = None

    def feed(self, chunk: bytes) -> Iterator[SseEvent]:
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = False
        buffer = self._buffer + chunk
        start = 0
        for end in _LINE_END.finditer(buffer):
            if end.group() == b"\r" and end.end() == len(buffer):
                self._skip_lf = True
            event = self._line(buffer[start : end.start()].decode("utf-8", "replace"))
            if event is not None:
                yield event
            start = end.end()
        self._buffer = buffer[start:]

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            data, event = self._data, self._event or "message"
            self._data, self._event = [], ""
            return SseEvent(event, "\n".join(data), self.last_id) if data else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None


def sse_events(chunks: Iterable[bytes]) -> Iterator[SseEvent]:
    decoder = SseDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)


@dataclass
class LogFollower:
    """A job's redacted log from `offset`, chunk by chunk."""

    client: RunnerClient
    job_id: str
    offset: int = 0
    poll_seconds: float = LOG_POLL_SECONDS
    complete: bool = False
    status: str | None = None  # the job's final status, from the stream's `end` event
    reconnect_delays: tuple[float, ...] = RECONNECT_DELAYS
    read_timeout: float = STREAM_READ_TIMEOUT_SECONDS
    reconnects: int = 0  # how many times the stream was opened again (for tests and messages)
    # Told (a line for a person) when the runner said "not now" and the stream waits to try again.
    notice: Callable[[str], None] | None = None

    def chunks(self, *, follow: bool, deadline: float | None = None) -> Iterator[str]:
        """Pages of `GET /logs`. Without `follow`: until the log is complete, or for a job still
        running until its current end. With it: until the job ends and all is read, or until
        `deadline` (a `time.monotonic()` value) passes; `complete` tells which."""
        path = jobs_path(self.job_id, "logs")
        while True:
            params = {"offset": self.offset, "limit": LOG_PAGE_BYTES}
            read = partial(self.client.get, path, params)
            # Only a follow rides out a restart: `jobs logs ID` is a one-shot read, and an
            # unreachable runner is one error line at once, as for every other one-shot command.
            page: dict[str, Any] = patiently(read) if follow else read()
            content = str(page.get("content") or "")
            if content:
                yield content
            self.offset = int(page.get("next_offset", self.offset))
            if page.get("is_complete"):
                self.complete = True
                return
            if content:
                continue  # more may be waiting right now: read it before sleeping
            if not follow or (deadline is not None and time.monotonic() >= deadline):
                return
            time.sleep(self.poll_seconds)

    def stream(self, *, deadline: float | None = None) -> Iterator[str]:
        """The log as it is written, over SSE, until the `end` event (then `complete` is set and
        `status` is the job's) or until `deadline` (a `time.monotonic()` value) passes.

        A dropped connection is opened again with `Last-Event-ID`, the offset after the last event
        received whole, so nothing is yielded twice or skipped. Reconnects in a row without an event
        are bounded (`reconnect_delays`); past them `RunnerUnreachable` is raised."""
        path = jobs_path(self.job_id, "logs", "stream")
        failures = 0
        last_id: str | None = None
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            read = self.read_timeout if remaining is None else min(self.read_timeout, remaining + 0.05)
            timeout = httpx.Timeout(STREAM_CONNECT_TIMEOUT_SECONDS, read=read)
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            problem = "the stream ended before the job did"
            try:
                with self.client.stream(
                    path, params={"offset": self.offset}, headers=headers, timeout=timeout
                ) as response:
                    for event in sse_events(response.iter_bytes()):
                        failures = 0
                        if event.event == "log":
                            content = self._take(event.data)
                            last_id = event.id if event.id is not None else str(self.offset)
                            if content:
                                yield content
                            if deadline is not None and time.monotonic() >= deadline:
                                return  # a job that keeps writing must not hold the wait past it
                        elif event.event == "end":
                            self.status = str(_decode(event.data).get("status"))
                            self.complete = True
                            return
            except RunnerUnreachable as exc:
                problem = exc.message
                retry_after = 0.0
            except RunnerBusy as exc:
                # 502/503/504: a proxy before a restarting runner, a database blip; 429
                # `too_many_streams`: this user's streams are all open (maybe this one's last
                # connection, not yet noticed gone by the server).
                problem = exc.reason()
                retry_after = exc.retry_after or 0.0
            else:
                retry_after = 0.0
            if deadline is not None and time.monotonic() >= deadline:
                return
            if failures >= len(self.reconnect_delays):
                raise RunnerUnreachable(
                    f"lost the log stream of job {self.job_id} at offset {self.offset} "
                    f"after {failures} reconnects: {problem}"
                )
            pause = max(self.reconnect_delays[failures], min(retry_after, MAX_RETRY_AFTER_SECONDS))
            failures += 1
            self.reconnects += 1
            if deadline is not None:
                pause = min(pause, max(deadline - time.monotonic(), 0.0))
            # Told when the runner said when to come back, and from a second failure in a row on:
            # one dropped connection is a restart's usual blip, more is a wait worth a line (SPEC
            # §11: long waits show progress).
            if (retry_after or failures > 1) and self.notice is not None:
                self.notice(
                    f"{problem}; trying again in {pause:g} s ({failures}/{len(self.reconnect_delays)})"
                )
            time.sleep(pause)

    def _take(self, data: str) -> str:
        """The content of a `log` event not yielded yet, advancing `offset` past it."""
        page = _decode(data)
        try:
            start, end, content = int(page["offset"]), int(page["next_offset"]), str(page["content"])
        except (KeyError, TypeError, ValueError):
            raise CliError(f"the runner sent a malformed log event: {data[:200]!r}") from None
        if end <= self.offset:
            return ""  # already had it
        if start < self.offset:  # overlaps what was had: keep only the new bytes
            content = content.encode()[self.offset - start :].decode("utf-8", "replace")
        self.offset = end
        return content


def _decode(data: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise CliError(f"the runner sent a malformed stream event: {data[:200]!r}")
    return value


def wait_for_job(
    client: RunnerClient,
    job_id: str,
    *,
    on_poll: Callable[[dict[str, Any]], None],
    deadline: float | None = None,
    poll_seconds: float = STATUS_POLL_SECONDS,
    notice: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], bool]:
    """(last job seen, whether it is terminal): polls until the job ends or `deadline` passes;
    `notice` hears the retries of a runner that does not answer for a while."""
    path = jobs_path(job_id)
    while True:
        job: dict[str, Any] = patiently(partial(client.get, path), notice=notice)
        on_poll(job)
        if job.get("status") in TERMINAL:
            return job, True
        if deadline is not None and time.monotonic() >= deadline:
            return job, False
        time.sleep(poll_seconds)
