"""POST /api/runner/jobs under concurrency, where creates are group-committed (api/create.py): each
request of a batch gets its own answer (201, 200 replay, 409, 429 with Retry-After, 401, 400),
nothing is lost and nothing extra is written; on SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections import Counter
from typing import Any

import httpx
import sqlalchemy as sa

from codex_runner.store.schema import events, idempotency_keys, jobs


def _slow_first_batch(api: Any) -> list[int]:
    """Records the batch sizes, and holds the first batch for a moment so that the requests sent
    meanwhile queue up and go together in the next one."""
    sizes: list[int] = []
    real = api.runtime.jobs.create_many
    lock = threading.Lock()

    def create_many(items: Any, limits: Any) -> Any:
        with lock:
            sizes.append(len(items))
            first = len(sizes) == 1
        if first:
            time.sleep(0.5)
        return real(items, limits)

    api.runtime.jobs.create_many = create_many
    return sizes


def _post(api: Any, token: str, body: Any, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    with httpx.Client(base_url=api.url, timeout=30) as c:
        if isinstance(body, bytes):
            return c.post(
                "/api/runner/jobs", content=body, headers={**headers, "content-type": "application/json"}
            )
        return c.post("/api/runner/jobs", json=body, headers=headers)


def _body(message: str, script: str = "echo") -> dict[str, Any]:
    return {"repo": "demo", "script_key": script, "args": {"message": message}}


def _count(api: Any, table: sa.Table, *where: Any) -> int:
    with api.runtime.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one())


def test_concurrent_mixed_creates_each_get_their_answer(api_factory: Any) -> None:
    api = api_factory(RUNNER_MAX_QUEUE_SIZE="100", RUNNER_MAX_QUEUED_PER_USER="10")
    earlier = _post(api, api.bob, _body("b"), "kb")
    assert earlier.status_code == 201
    revoked, record = api.runtime.tokens.create("mallory", "user")
    api.runtime.tokens.revoke(record["id"])
    sizes = _slow_first_batch(api)

    calls: list[tuple[str, str, Any, str | None]] = [("first", api.bob, _body("warm"), None)]
    calls += [("alice", api.alice, _body(f"a{i}"), None) for i in range(14)]
    calls += [("bob replay", api.bob, _body("b"), "kb") for _ in range(10)]
    calls += [("bob conflict", api.bob, _body("other"), "kb") for _ in range(5)]
    calls += [("admin race", api.admin, _body("c"), "kc") for _ in range(8)]
    calls += [("revoked", revoked, _body("r"), None) for _ in range(3)]
    calls += [("bad body", api.alice, b'{"repo": "demo", "script_key": 5}', None) for _ in range(3)]
    calls += [("unknown script", api.alice, _body("u", script="nope"), None) for _ in range(2)]

    def one(call: tuple[str, str, Any, str | None]) -> tuple[str, httpx.Response]:
        return call[0], _post(api, call[1], call[2], call[3])

    with cf.ThreadPoolExecutor(max_workers=len(calls)) as pool:
        first = pool.submit(one, calls[0])
        time.sleep(0.1)  # the first batch is under way (and held): the rest queue behind it
        results = [first.result(), *pool.map(one, calls[1:])]

    assert len(sizes) >= 2 and max(sizes) > 1, sizes  # the path under test: real batches
    by_kind: dict[str, Counter[int]] = {}
    for kind, r in results:
        by_kind.setdefault(kind, Counter())[r.status_code] += 1
    # bob's earlier job and "warm" are queued: alice alone meets her cap of 10.
    assert by_kind["first"] == {201: 1}
    assert by_kind["alice"] == {201: 10, 429: 4}
    assert by_kind["bob replay"] == {200: 10}
    assert by_kind["bob conflict"] == {409: 5}
    assert by_kind["admin race"] == {201: 1, 200: 7}
    assert by_kind["revoked"] == {401: 3}
    assert by_kind["bad body"] == {400: 3}
    assert by_kind["unknown script"] == {400: 2}

    for kind, r in results:
        payload = r.json()
        if r.status_code == 429:
            assert payload["code"] == "user_queue_full" and int(r.headers["Retry-After"]) > 0
        elif r.status_code == 409:
            assert payload["code"] == "idempotency_key_reused_with_different_payload"
        elif r.status_code == 400:
            assert payload["code"] == ("unknown_script" if kind == "unknown script" else "invalid_request")
        elif r.status_code == 200:
            assert payload["deduplicated"] is True
    replays = {r.json()["id"] for kind, r in results if kind == "bob replay"}
    assert replays == {earlier.json()["id"]}
    race_ids = {r.json()["id"] for kind, r in results if kind == "admin race"}
    assert len(race_ids) == 1

    created = 1 + sum(1 for _, r in results if r.status_code == 201)
    assert created == 13
    assert _count(api, jobs) == created
    assert _count(api, events, events.c.event_type == "job_created") == created
    assert _count(api, events, events.c.event_type == "job_deduplicated") == 17
    assert _count(api, idempotency_keys) == 2
    # The counts table, kept by triggers, agrees with the jobs.
    assert api.runtime.jobs.counts_by_status().get("queued") == created


def test_global_cap_in_one_batch(api_factory: Any) -> None:
    api = api_factory(RUNNER_MAX_QUEUE_SIZE="5", RUNNER_MAX_QUEUED_PER_USER="100")
    sizes = _slow_first_batch(api)
    tokens = [api.alice, api.bob] * 6

    with cf.ThreadPoolExecutor(max_workers=len(tokens)) as pool:
        first = pool.submit(_post, api, tokens[0], _body("x0"))
        time.sleep(0.1)
        rest = list(pool.map(lambda i: _post(api, tokens[i], _body(f"x{i}")), range(1, len(tokens))))
    results = [first.result(), *rest]

    assert max(sizes) > 1, sizes
    codes = Counter(r.status_code for r in results)
    assert codes == {201: 5, 429: 7}
    for r in results:
        if r.status_code == 429:
            assert r.json()["code"] == "queue_full" and int(r.headers["Retry-After"]) > 0
    assert _count(api, jobs) == 5


def test_revoked_token_fails_on_its_next_request(api: Any) -> None:
    token, record = api.runtime.tokens.create("frank", "user")
    assert _post(api, token, _body("before")).status_code == 201
    api.runtime.tokens.revoke(record["id"])
    r = _post(api, token, _body("after"))
    assert r.status_code == 401 and r.json()["code"] == "not_authenticated"
    assert _count(api, jobs) == 1


def test_openapi_documents_the_create_body(api: Any) -> None:
    spec = api.client(api.alice).get("/openapi.json").json()
    create = spec["paths"]["/api/runner/jobs"]["post"]
    schema = create["requestBody"]["content"]["application/json"]["schema"]
    assert {"repo_id", "repo", "script_key", "args"} <= set(schema["properties"])
    assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in create["parameters"])


def test_openapi_documents_400_not_fastapis_422(api: Any) -> None:
    """Validation errors answer 400 `invalid_request` (SPEC §4); the document listed FastAPI's 422
    on every route with parameters, a code the service never sends."""
    c = api.client(api.alice)
    spec = c.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation.get("responses", {}), (method, path)
    listing = spec["paths"]["/api/runner/jobs"]["get"]["responses"]
    assert "400" in listing
    assert c.get("/api/runner/jobs", params={"limit": 0}).status_code == 400
    assert "HTTPValidationError" not in spec.get("components", {}).get("schemas", {})
