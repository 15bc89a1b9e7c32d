"""Unexpected errors: the SPEC's 500 body, and one service log line naming the exception's type,
never its text or a traceback (either could carry a secret)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import structlog
from fastapi.responses import StreamingResponse

from codex_runner.ops.logging import configure_logging

SECRET_TEXT = "postgresql://runner:hunter2hunter2@db/runner"


class Boom(RuntimeError):
    pass


@pytest.fixture
def service_log(api: Any) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(api.runtime.settings, stream=stream)
    try:
        yield stream
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()


def test_unexpected_error_is_a_500_logged_by_type_only(api: Any, service_log: io.StringIO) -> None:
    def boom() -> None:
        raise Boom(f"cannot reach {SECRET_TEXT}")

    async def broken_stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first part\n"
            raise Boom(f"mid-stream {SECRET_TEXT}")

        return StreamingResponse(body())

    api.app.add_api_route("/api/test/boom", boom)
    api.app.add_api_route("/api/test/broken-stream", broken_stream)
    c = api.client(api.alice)
    r = c.get("/api/test/boom")
    assert r.status_code == 500
    assert r.json() == {"detail": "internal error", "code": "internal_error"}
    # An answer already under way cannot become a 500: it is cut short, and logged the same way.
    with c.stream("GET", "/api/test/broken-stream") as streamed:
        assert streamed.status_code == 200
        # The server closes the connection mid-body: that is what a client sees.
        with contextlib.suppress(httpx.HTTPError):
            b"".join(streamed.iter_bytes())
    assert c.get("/healthz").status_code == 200  # the server lives on
    text = service_log.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    ours = [(line["event"], line.get("error_type")) for line in lines if line["logger"] == "codex_runner.api"]
    assert ours == [("unhandled_error", "Boom"), ("unhandled_error", "Boom")], text
    # uvicorn says, without details, that the second answer was cut short; nothing else is an error.
    others = [
        line["event"] for line in lines if line["level"] == "error" and line["logger"] != "codex_runner.api"
    ]
    assert others == ["ASGI callable returned without completing response."], text
    assert "hunter2" not in text and "Traceback" not in text and "Exception in ASGI" not in text


def test_a_405_names_the_allowed_methods_and_health_routes_take_head(api: Any) -> None:
    """The error handler rebuilt Starlette's 405 without its `Allow` header (RFC 9110), and a
    load balancer's `HEAD /healthz` was a 405."""
    c = api.client(api.alice)
    r = c.get("/api/runner/jobs/0b7c3f4e-1111-4222-8333-444455556666/cancel")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["code"] == "method_not_allowed"
    for path in ("/healthz", "/readyz"):
        assert httpx.head(f"{api.url}{path}", timeout=10).status_code == 200


def test_a_405_allows_every_method_of_the_path(api: Any) -> None:
    """RFC 9110: `Allow` lists the methods the resource supports. Starlette named only the first
    matching route's: `POST` for `/api/runner/jobs` (a GET lists jobs), `HEAD` for `/healthz`."""
    c = api.client(api.alice)
    cases = [
        ("DELETE", "/api/runner/jobs", "GET, POST"),
        ("POST", "/healthz", "GET, HEAD"),
        ("PUT", "/readyz", "GET, HEAD"),
        ("DELETE", "/api/runner/jobs/0b7c3f4e-1111-4222-8333-444455556666", "GET"),
    ]
    for method, path, allow in cases:
        r = c.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.headers)
        assert r.json()["code"] == "method_not_allowed"


def test_every_400_about_a_field_names_it(api: Any) -> None:
    """SPEC §4: validation errors add `errors` with a `loc`. A bad body shape did, a bad
    `Idempotency-Key`, an unknown repo or script did not: a client could not map them to a field."""
    cases = [
        (
            {"repo": "demo", "script_key": "echo", "args": {"message": "hi"}},
            {"Idempotency-Key": "é"},
            ["header", "Idempotency-Key"],
        ),
        ({"repo": "nope", "script_key": "echo", "args": {}}, {}, ["body", "repo"]),
        (
            {"repo_id": "0b7c3f4e-1111-4222-8333-444455556666", "script_key": "echo", "args": {}},
            {},
            ["body", "repo_id"],
        ),
        ({"repo": "demo", "script_key": "nope", "args": {}}, {}, ["body", "script_key"]),
    ]
    c = api.client(api.alice)
    for body, headers, loc in cases:
        r = c.post("/api/runner/jobs", json=body, headers={k: v.encode() for k, v in headers.items()})
        assert r.status_code == 400, r.text
        assert r.json()["errors"][0]["loc"] == loc, r.text


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_under_another_content_type_says_so(api: Any, content_type: str) -> None:
    """`curl -d '{…}'` sends a JSON body as a form: the answer was "Input should be a valid
    dictionary or object to extract fields from" about a body that is one, with no word about the
    header that was wrong."""
    body = json.dumps({"repo": "demo", "script_key": "echo", "args": {"message": "hi"}})
    r = api.client(api.alice).post("/api/runner/jobs", content=body, headers={"content-type": content_type})
    assert r.status_code == 400, r.text
    payload = r.json()
    assert payload["code"] == "invalid_request"
    assert "application/json" in payload["detail"] and content_type in payload["detail"]
    assert payload["errors"][0]["loc"] == ["header", "Content-Type"]


def test_a_path_no_route_serves_is_named_in_the_404(api: Any) -> None:
    """Starlette's "Not Found" for a path no route serves read like a missing job; the answer
    names the method and path, so a client behind a wrong prefix sees what it asked for."""
    r = api.client(api.alice).get("/runner/api/runner/jobs")
    assert r.status_code == 404
    assert r.json() == {"detail": "no route GET /runner/api/runner/jobs", "code": "not_found"}
    long = api.client(api.alice).get("/x" * 5000)
    assert long.status_code == 404 and len(long.json()["detail"]) < 300
    job = api.client(api.alice).get("/api/runner/jobs/00000000-0000-4000-8000-000000000000")
    assert job.json()["detail"] == "job 00000000-0000-4000-8000-000000000000 not found"


@pytest.mark.parametrize(
    "method,suffix", [("get", ""), ("post", "/cancel"), ("get", "/logs"), ("get", "/events")]
)
def test_a_path_that_is_no_job_id_is_not_echoed_whole(api: Any, method: str, suffix: str) -> None:
    """The 404 for `/jobs/<anything>` echoed the path segment whole, control characters and all,
    into the answer the CLI prints (and it cost a database trip): a segment that is no job id is
    named cut short and shown as text, and the answer says what a job id looks like."""
    segment = "a\x1b[2J" + "b" * 3000
    r = getattr(api.client(api.alice), method)(f"/api/runner/jobs/{urllib.parse.quote(segment)}{suffix}")
    assert r.status_code == 404, r.text
    detail = r.json()["detail"]
    assert len(detail) < 200 and "\x1b" not in detail and "b" * 100 not in detail, detail
    assert "UUID" in detail, detail


def test_a_runner_error_without_a_status_is_the_specs_500(api: Any, service_log: io.StringIO) -> None:
    """docs/api.md: a 500 answers `internal_error` and logs `unhandled_error` by type. A runner
    error the API has no status for (a lost lease, a configuration error met mid-request) answered
    500 with its own code (`lease_lost`) and its message, and logged nothing."""
    from codex_runner.errors import LeaseLost

    def lost() -> None:
        raise LeaseLost(f"lease lost while writing to {SECRET_TEXT}")

    api.app.add_api_route("/api/test/lost", lost)
    r = api.client(api.alice).get("/api/test/lost")
    assert r.status_code == 500
    assert r.json() == {"detail": "internal error", "code": "internal_error"}
    lines = [json.loads(line) for line in service_log.getvalue().splitlines()]
    ours = [(line["event"], line.get("error_type")) for line in lines if line["logger"] == "codex_runner.api"]
    assert ours == [("unhandled_error", "LeaseLost")]
    assert "hunter2" not in service_log.getvalue()


def test_a_trailing_slash_is_no_route_not_a_redirect_to_the_host_header(api: Any) -> None:
    """Found by tests/api/test_api_fuzz.py: Starlette answered `/api/runner/jobs/` (and every
    route's path with a trailing slash) with an empty `307` to a URL built from the request's
    `Host` header: a status docs/api.md does not give, no JSON error, and a redirect a client
    (one that follows it with its token) takes to whatever host the request named."""
    c = api.client(api.alice)
    for method, path in [
        ("GET", "/api/runner/jobs/"),
        ("POST", "/api/runner/jobs/"),
        ("GET", "/api/runner/repos/"),
        ("GET", "/api/runner/jobs/0b7c3f4e-1111-4222-8333-444455556666/events/"),
        ("GET", "/healthz/"),
    ]:
        r = c.request(method, path, headers={"Host": "elsewhere.example"})
        assert r.status_code == 404, (method, path, r.status_code, r.headers.get("location"))
        assert "location" not in r.headers
        assert r.json() == {"detail": f"no route {method} {path}", "code": "not_found"}
