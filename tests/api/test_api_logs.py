"""Log routes: paging edge cases and the SSE stream, on SQLite and PostgreSQL (issue 5)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any

import httpx

from codex_runner.jobs import Status
from codex_runner.logs.location import mark_writer

from tests.helpers import wait_until

SECRET = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"


def _job_with_log(api: Any, text: bytes, *, terminal: bool = True) -> tuple[str, Any]:
    job = api.create(api.alice).json()
    claimed = api.runtime.jobs.claim("r", slots=1, max_jobs_per_user=5)[0]
    path = api.runtime.settings.log_dir / f"{job['id']}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)
    if terminal:
        api.runtime.jobs.transition(
            job["id"], Status.RUNNING, Status.SUCCESS, lease_token=claimed.lease_token
        )
    return job["id"], claimed


def _read_all(client: httpx.Client, job_id: str, limit: int) -> tuple[str, list[dict[str, Any]]]:
    offset, parts, pages = 0, [], []
    for _ in range(100_000):
        page = client.get(f"/api/runner/jobs/{job_id}/logs", params={"offset": offset, "limit": limit}).json()
        pages.append(page)
        parts.append(page["content"])
        if page["is_complete"]:
            break
        assert page["next_offset"] > offset or page["content"] == ""
        offset = page["next_offset"]
    return "".join(parts), pages


def test_pages_concatenate_and_hide_secrets(api: Any) -> None:
    # Small: limit=1 costs one request per byte; the property tests cover big logs.
    text = ("h\u00e9llo \u2603\n" * 4 + f"token={SECRET}\n" + "tail \U0001f600\n" * 3).encode()
    job_id, _ = _job_with_log(api, text)
    c = api.client(api.alice)
    full, _ = _read_all(c, job_id, 131072)
    assert SECRET not in full and "[REDACTED:" in full
    # Limits of 4+ bytes: a smaller one cannot hold a 4-byte character (docs/logs.md).
    for limit in (4, 5, 7, 64, 1000):
        joined, pages = _read_all(c, job_id, limit)
        assert joined == full
        for page in pages:
            assert len(page["content"].encode()) <= limit
            assert SECRET[:8] not in page["content"]
            assert page["redaction_version"] == "v4"


def test_offset_edges(api: Any) -> None:
    job_id, _ = _job_with_log(api, "\u00e9\u00e9\u00e9\n".encode())  # 7 bytes
    c = api.client(api.alice)
    past = c.get(f"/api/runner/jobs/{job_id}/logs", params={"offset": 1000}).json()
    assert past["content"] == "" and past["next_offset"] == 1000 and past["offset"] == 1000
    inside = c.get(f"/api/runner/jobs/{job_id}/logs", params={"offset": 1}).json()
    assert inside["offset"] == 2 and inside["content"] == "\u00e9\u00e9\n"
    for bad in (0, 131073, -1):
        r = c.get(f"/api/runner/jobs/{job_id}/logs", params={"limit": bad})
        assert r.status_code == 400 and r.json()["code"] == "invalid_request"
    r = c.get(f"/api/runner/jobs/{job_id}/logs", params={"offset": -1})
    assert r.status_code == 400


def test_canceled_while_queued_log_is_empty_and_complete(api: Any) -> None:
    job = api.create(api.alice).json()
    c = api.client(api.alice)
    assert c.post(f"/api/runner/jobs/{job['id']}/cancel").status_code == 200
    page = c.get(f"/api/runner/jobs/{job['id']}/logs").json()
    assert page == {
        "job_id": job["id"],
        "offset": 0,
        "next_offset": 0,
        "is_complete": True,
        "content": "",
        "redaction_version": "v4",
    }


def test_another_users_log_is_404(api: Any) -> None:
    job_id, _ = _job_with_log(api, b"private\n")
    bob = api.client(api.bob)
    assert bob.get(f"/api/runner/jobs/{job_id}/logs").status_code == 404
    assert bob.get(f"/api/runner/jobs/{job_id}/logs/stream").status_code == 404


def _sse_events(response: httpx.Response, stop_after: int | None = None) -> list[tuple[str, str, str]]:
    events: list[tuple[str, str, str]] = []
    kind = ident = ""
    data: list[str] = []
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if line == "":
            if kind:
                events.append((kind, ident, "\n".join(data)))
                if kind == "end" or (stop_after is not None and len(events) >= stop_after):
                    return events
            kind, ident, data = "", "", []
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            kind = value
        elif field == "id":
            ident = value
        elif field == "data":
            data.append(value)
    return events


def test_sse_resume_with_last_event_id_gets_every_byte_once(api: Any) -> None:
    job_id, claimed = _job_with_log(api, b"", terminal=False)
    path = api.runtime.settings.log_dir / f"{job_id}.log"
    lines = [f"line {i} \u00e9 {SECRET if i % 7 == 0 else ''}\n" for i in range(300)]
    stop = threading.Event()

    def writer() -> None:
        with path.open("ab") as fh:
            for line in lines:
                fh.write(line.encode())
                fh.flush()
                time.sleep(0.002)
        api.runtime.jobs.transition(job_id, Status.RUNNING, Status.SUCCESS, lease_token=claimed.lease_token)
        stop.set()

    t = threading.Thread(target=writer)
    t.start()
    c = api.client(api.alice)
    received: list[str] = []
    with c.stream("GET", f"/api/runner/jobs/{job_id}/logs/stream", timeout=30) as r:
        assert r.status_code == 200
        first = _sse_events(r, stop_after=3)
    last_id = ""
    for kind, ident, data in first:
        assert kind == "log"
        received.append(json.loads(data)["content"])
        last_id = ident
    assert last_id
    with c.stream(
        "GET", f"/api/runner/jobs/{job_id}/logs/stream", headers={"Last-Event-ID": last_id}, timeout=60
    ) as r:
        rest = _sse_events(r)
    t.join(timeout=30)
    assert stop.is_set()
    assert rest[-1][0] == "end" and json.loads(rest[-1][2])["status"] == "success"
    offsets = [json.loads(d)["offset"] for k, _, d in rest if k == "log"]
    assert offsets and offsets[0] == int(last_id)
    received += [json.loads(d)["content"] for k, _, d in rest if k == "log"]
    full, _ = _read_all(c, job_id, 131072)
    assert "".join(received) == full
    assert SECRET not in full


def test_sse_last_event_id_must_be_an_offset(api: Any) -> None:
    """`Last-Event-ID` is an `id` the stream sent: 1-20 ASCII digits. Anything else answers 400
    `invalid_request`, as a bad `offset` does; `str.isdigit` let Unicode digits ("²", from latin-1
    header bytes) and 5000-digit values through to `int()`, a 500."""
    job_id, _ = _job_with_log(api, b"hello\n")
    c = api.client(api.alice)
    path = f"/api/runner/jobs/{job_id}/logs/stream"
    for bad in (b"\xb2", "\u0663".encode(), b"1" * 5000, b"1" * 21, b"-1", b"+1", b"1 2", b"0x10", b"abc"):
        r = c.get(path, headers={"Last-Event-ID": bad})
        assert r.status_code == 400, (bad[:10], r.status_code, r.text)
        body = r.json()
        assert body["code"] == "invalid_request" and body["errors"][0]["loc"] == ["header", "Last-Event-ID"]
    # Blank: the `offset` parameter applies, else the header wins. The largest id is past the end.
    for header, offset, first in ((b"", 2, "llo\n"), (b"3", 0, "lo\n"), (b"0", 2, "hello\n")):
        with c.stream("GET", path, params={"offset": offset}, headers={"Last-Event-ID": header}) as r:
            events = _sse_events(r)
        assert r.status_code == 200 and json.loads(events[0][2])["content"] == first, header
    with c.stream("GET", path, headers={"Last-Event-ID": "9" * 20}) as r:
        events = _sse_events(r)
    assert [kind for kind, _, _ in events] == ["end"] and events[0][1] == "9" * 20


def test_an_idle_stream_reads_the_status_a_few_times_a_second(api: Any, monkeypatch: Any) -> None:
    """A stream whose log does not grow asks the database about its job every
    `STATUS_POLL_SECONDS`, not every poll: a few hundred idle streams must not load it. Output
    still arrives within a poll, and the end within a status poll."""
    from codex_runner.api import logs as log_routes

    calls: list[float] = []
    real = log_routes._status

    def counted(*args: Any) -> Status:
        calls.append(time.monotonic())
        return real(*args)

    monkeypatch.setattr(log_routes, "_status", counted)
    job_id, claimed = _job_with_log(api, b"first\n", terminal=False)
    path = api.runtime.settings.log_dir / f"{job_id}.log"
    c = api.client(api.alice)
    seen: list[tuple[str, str]] = []
    with c.stream("GET", f"/api/runner/jobs/{job_id}/logs/stream", timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data:"):
                seen.append(("log", json.loads(line[5:])["content"]))
                break
        before = len(calls)
        time.sleep(1.0)  # idle: nothing written
        idle_calls = len(calls) - before
        t0 = time.monotonic()
        with path.open("ab") as fh:
            fh.write(b"second\n")
        for line in lines:
            if line.startswith("data:"):
                seen.append(("log", json.loads(line[5:])["content"]))
                break
        assert time.monotonic() - t0 < 1.0
        api.runtime.jobs.transition(job_id, Status.RUNNING, Status.SUCCESS, lease_token=claimed.lease_token)
        t1 = time.monotonic()
        for line in lines:
            if line.startswith("event: end"):
                break
        assert time.monotonic() - t1 < 2.0
    assert seen == [("log", "first\n"), ("log", "second\n")]
    assert idle_calls <= 6, f"{idle_calls} status reads in 1 s of an idle stream"


def test_an_open_stream_stops_when_its_token_is_revoked(api: Any) -> None:
    """The token was checked once, when the stream opened: after a revocation (which "stops working
    at once") an open stream went on delivering the job's output. It ends within a few seconds,
    and what is written after the revocation is not sent."""
    token, record = api.runtime.tokens.create("alice", "user", "soon revoked")
    job_id, _ = _job_with_log(api, b"before\n", terminal=False)
    path = api.runtime.settings.log_dir / f"{job_id}.log"
    c = api.client(token)
    seen: list[str] = []
    with c.stream("GET", f"/api/runner/jobs/{job_id}/logs/stream", timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data:"):
                seen.append(json.loads(line[5:])["content"])
                break
        api.runtime.tokens.revoke(record["id"])
        time.sleep(AUTH_RECHECK + 0.5)
        with path.open("ab") as fh:
            fh.write(b"written after the revocation\n")
        started = time.monotonic()
        for line in lines:  # ends (the server closes it) instead of carrying the new output
            if line.startswith("data:"):
                seen.append(json.loads(line[5:])["content"])
        assert time.monotonic() - started < 10
    assert seen == ["before\n"]


AUTH_RECHECK = 1.0


def test_an_offset_is_one_a_resume_can_take_back(api: Any) -> None:
    """`offset` had no bound while `Last-Event-ID` takes 20 digits: a stream opened past that sent
    an event id its own resume refused (a 400, and an EventSource gives up for good)."""
    job_id, _ = _job_with_log(api, b"hello\n")
    c = api.client(api.alice)
    for path in (f"/api/runner/jobs/{job_id}/logs", f"/api/runner/jobs/{job_id}/logs/stream"):
        r = c.get(path, params={"offset": 10**20})
        assert r.status_code == 400 and r.json()["errors"][0]["loc"] == ["query", "offset"], r.text
    with c.stream("GET", f"/api/runner/jobs/{job_id}/logs/stream", params={"offset": 10**20 - 1}) as r:
        events = _sse_events(r)
    assert r.status_code == 200 and events[0][1] == "9" * 20
    with c.stream(
        "GET", f"/api/runner/jobs/{job_id}/logs/stream", headers={"Last-Event-ID": events[0][1]}
    ) as r:
        assert r.status_code == 200


def test_a_user_has_at_most_max_streams_per_user_open(api_factory: Any) -> None:
    """Each open stream costs a connection, a descriptor and thread trips several times a second in
    the pool the launcher shares: one user's hundreds of followers slowed every request to seconds.
    Past RUNNER_MAX_STREAMS_PER_USER a new stream is a 429 with `Retry-After`; one that ends (or a
    client that leaves) gives its place back; another user has places of their own."""
    api = api_factory(RUNNER_MAX_STREAMS_PER_USER="2")
    job_id, _ = _job_with_log(api, b"running\n", terminal=False)
    path = f"/api/runner/jobs/{job_id}/logs/stream"
    alice = [api.client(api.alice) for _ in range(3)]
    # Kept: an abandoned line iterator closes its connection (httpcore), ending the stream.
    readers: list[Any] = []

    def first_data(r: Any) -> str:
        lines = r.iter_lines()
        readers.append(lines)
        for line in lines:
            if line.startswith("data:"):
                return str(json.loads(line[5:])["content"])
        raise AssertionError("the stream ended")

    with contextlib.ExitStack() as open_streams:
        for c in alice[:2]:
            r = open_streams.enter_context(c.stream("GET", path, timeout=30))
            assert r.status_code == 200 and first_data(r) == "running\n"
        assert api.runtime.open_streams == {"alice": 2}
        refused = alice[2].get(path, timeout=30)
        assert refused.status_code == 429, refused.text
        assert refused.json()["code"] == "too_many_streams" and refused.headers["Retry-After"] == "5"
        # Pages are not streams; and an admin counts as a user of their own.
        assert alice[2].get(f"/api/runner/jobs/{job_id}/logs").status_code == 200
        with api.client(api.admin).stream("GET", path, timeout=30) as admin:
            assert admin.status_code == 200 and first_data(admin) == "running\n"
    readers.clear()
    # Closed by the client: their places come back once the server has seen them go.
    assert wait_until(lambda: not api.runtime.open_streams, timeout=10), api.runtime.open_streams
    with alice[2].stream("GET", path, timeout=30) as r:
        assert r.status_code == 200 and first_data(r) == "running\n"


def test_a_stream_whose_client_stops_reading_is_dropped(api: Any, monkeypatch: Any) -> None:
    """A client that opened a stream and stopped reading held it for ever (its sends waited for
    room in the connection, with no limit): its connection, its place among the user's streams,
    and a token no longer rechecked. A send that waits `SEND_TIMEOUT_SECONDS` ends the stream."""
    import socket

    from structlog.testing import capture_logs

    from codex_runner.api import logs as logs_module

    monkeypatch.setattr(logs_module, "SEND_TIMEOUT_SECONDS", 1.0, raising=False)
    line = b"x" * 1023 + b"\n"
    job_id, _ = _job_with_log(api, line * 40 * 1024, terminal=False)  # 40 MiB: more than any buffer
    host, port = api.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = (
            f"GET /api/runner/jobs/{job_id}/logs/stream HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {api.alice}\r\n\r\n"
        )
        sock.sendall(request.encode())
        assert sock.recv(12) == b"HTTP/1.1 200"  # and then never another byte read
        assert wait_until(lambda: api.runtime.open_streams == {"alice": 1}, timeout=10)
        with capture_logs() as logged:
            assert wait_until(lambda: not api.runtime.open_streams, timeout=20), api.runtime.open_streams
            assert wait_until(lambda: any(e["event"] == "log_stream_dropped" for e in logged), timeout=10)
        assert not [e for e in logged if e["event"] == "unhandled_error"], logged  # an expected end


def test_a_started_jobs_missing_log_is_empty_only_where_its_instance_writes_logs(api: Any) -> None:
    """A job claimed by an instance that writes into another log folder (another host, another
    data folder) answers 409 `log_not_here`; one whose instance writes here (its log not opened
    yet: a claim, a long prepare) is an empty page, as is one of this very instance."""
    job = api.create(api.alice).json()
    api.runtime.jobs.claim("elsewhere", slots=1, max_jobs_per_user=5)
    c = api.client(api.alice)
    r = c.get(f"/api/runner/jobs/{job['id']}/logs")
    assert r.status_code == 409 and r.json()["code"] == "log_not_here", r.text
    assert "elsewhere" in r.json()["detail"]
    assert c.get(f"/api/runner/jobs/{job['id']}/logs/stream").status_code == 409

    mark_writer(api.runtime.settings.log_dir, "elsewhere")
    page = c.get(f"/api/runner/jobs/{job['id']}/logs").json()
    assert page["content"] == "" and page["is_complete"] is False

    mine = api.create(api.alice).json()
    api.runtime.jobs.claim(api.runtime.settings.id, slots=1, max_jobs_per_user=5)
    assert c.get(f"/api/runner/jobs/{mine['id']}/logs").status_code == 200
