"""`POST /api/runner/jobs` is answered by a bare ASGI handler ahead of FastAPI (api/create.py).
These tests send the same requests through it and through the declared FastAPI route, on one
server, and require the same answers: status, error body, the headers that matter, and metrics."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from codex_runner.api.create import CREATE_PATH

OK = {"repo": "demo", "script_key": "echo", "args": {"message": "hi"}}
JSON = {"content-type": "application/json"}


def _cases(api: Any, key: str) -> list[tuple[str, dict[str, str], Any]]:
    """(name, headers, body) of each request; `key` keeps the two passes' idempotency keys apart."""
    alice = {"Authorization": f"Bearer {api.alice}"}
    return [
        ("no token", {}, OK),
        ("not bearer", {"Authorization": f"Basic {api.alice}"}, OK),
        ("two words", {"Authorization": f"Bearer {api.alice} x"}, OK),
        ("wrong token", {"Authorization": "Bearer cr_" + "x" * 40}, OK),
        ("revoked-looking jwt", {"Authorization": "Bearer a.b.c"}, OK),
        ("bad json", {**alice, **JSON}, b"{not json"),
        ("empty body", {**alice, **JSON}, b""),
        ("text body", {**alice, "content-type": "text/plain"}, b"hello"),
        ("args not a dict", alice, {"repo": "demo", "script_key": "echo", "args": []}),
        ("extra field", alice, {**OK, "extra": 1}),
        ("no repo", alice, {"script_key": "echo", "args": {"message": "x"}}),
        ("unknown repo", alice, {"repo": "nope", "script_key": "echo", "args": {}}),
        ("unknown script", alice, {"repo": "demo", "script_key": "nope", "args": {}}),
        ("missing arg", alice, {"repo": "demo", "script_key": "echo", "args": {}}),
        ("disabled repo", alice, {"repo": "off", "script_key": "echo", "args": {"message": "x"}}),
        ("not allowed repo", alice, {"repo": "outside", "script_key": "echo", "args": {"message": "x"}}),
        ("empty key", {**alice, "Idempotency-Key": ""}, OK),
        ("huge body", alice, {"repo": "demo", "script_key": "echo", "args": {"message": "x" * 1_100_000}}),
        ("created", alice, OK),
        ("keyed", {**alice, "Idempotency-Key": key}, OK),
        ("replayed", {**alice, "Idempotency-Key": key}, OK),
        ("key reused", {**alice, "Idempotency-Key": key}, {**OK, "args": {"message": "other"}}),
    ]


def _send(api: Any, headers: dict[str, str], body: Any) -> httpx.Response:
    with httpx.Client(base_url=api.url, timeout=30) as c:
        if not isinstance(body, dict):  # bytes, or an iterator of chunks (a streamed body)
            return c.post(CREATE_PATH, content=body, headers=headers)
        return c.post(CREATE_PATH, json=body, headers=headers)


def _shape(r: httpx.Response) -> tuple[Any, ...]:
    """What must match: status, the headers clients act on, and the body with per-job values out."""
    body = r.json()
    for volatile in ("id", "created_at", "updated_at", "queued_at"):
        if volatile in body:
            body[volatile] = "*"
    headers = {h: r.headers.get(h) for h in ("content-type", "www-authenticate", "retry-after")}
    return r.status_code, headers, body


def test_fast_path_answers_as_the_declared_route(api: Any) -> None:
    assert api.app.fast_create is not None
    fast = [(name, _shape(_send(api, h, b))) for name, h, b in _cases(api, "key-fast")]
    api.app.fast_create = None
    slow = [(name, _shape(_send(api, h, b))) for name, h, b in _cases(api, "key-slow")]
    for (name, f), (_, s) in zip(fast, slow, strict=True):
        assert f == s, name
    statuses = {name: shape[0] for name, shape in fast}
    assert statuses["no token"] == statuses["wrong token"] == 401
    assert statuses["bad json"] == statuses["unknown script"] == 400
    assert statuses["disabled repo"] == 403 and statuses["huge body"] == 413
    assert statuses["created"] == statuses["keyed"] == 201 and statuses["replayed"] == 200
    assert statuses["key reused"] == 409


def test_fast_path_streamed_body_over_the_cap_is_413(api: Any) -> None:
    def chunks() -> Any:
        for _ in range(40):
            yield b" " * 65536

    r = _send(api, {"Authorization": f"Bearer {api.alice}", **JSON}, chunks())
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"


@pytest.mark.parametrize("fast", [True, False])
def test_queue_full_has_retry_after_either_way(api_factory: Any, fast: bool) -> None:
    api = api_factory(RUNNER_MAX_QUEUED_PER_USER="1")
    if not fast:
        api.app.fast_create = None
    assert api.create(api.alice).status_code == 201
    r = api.create(api.alice)
    assert r.status_code == 429 and r.json()["code"] == "user_queue_full"
    assert int(r.headers["Retry-After"]) > 0


def test_fast_path_counts_in_metrics(api: Any) -> None:
    assert api.create(api.alice).status_code == 201
    assert api.create("cr_" + "y" * 40).status_code == 401
    text = api.client(api.admin).get("/metrics").text

    def count(status: str) -> float:
        pattern = (
            r'runner_http_requests_total\{method="POST",route="/api/runner/jobs",status="'
            + status
            + r'"\} (\S+)'
        )
        found = re.search(pattern, text)
        return float(found.group(1)) if found else 0.0

    assert count("201") == 1.0 and count("401") == 1.0
    assert 'runner_http_request_duration_seconds_count{method="POST",route="/api/runner/jobs"}' in text
