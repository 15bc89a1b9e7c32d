"""Job routes over a real server, on SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import warnings
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa

from codex_runner.errors import InvalidRequest
from codex_runner.jobs import payload_hash
from codex_runner.store.schema import events, idempotency_keys, jobs


def _count(api: Any, table: sa.Table) -> int:
    with api.runtime.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_create_get_list_events(api: Any) -> None:
    r = api.create(api.alice)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued"
    assert job["deduplicated"] is False
    assert job["args"] == {"message": "hi", "count": 1, "loud": False, "mode": "fast"}
    assert job["requested_by"] == "alice"
    assert job["created_at"].endswith("Z")
    assert job["result"] is None
    assert [s["name"] for s in job["stages"]] == ["prepare", "script", "commit", "push", "cleanup"]

    got = api.client(api.alice).get(f"/api/runner/jobs/{job['id']}").json()
    assert got["id"] == job["id"]
    assert [e["event_type"] for e in got["events"]] == ["job_created"]
    assert got["events"][0]["actor"] == "alice"

    listing = api.client(api.alice).get("/api/runner/jobs").json()
    assert listing["total"] == 1 and listing["items"][0]["id"] == job["id"]
    assert listing["limit"] == 50 and listing["offset"] == 0
    ev = api.client(api.alice).get(f"/api/runner/jobs/{job['id']}/events").json()
    assert ev["items"][0]["event_type"] == "job_created"


def test_another_users_job_is_404_and_admin_sees_all(api: Any) -> None:
    job = api.create(api.alice).json()
    bob = api.client(api.bob)
    for path in (f"/api/runner/jobs/{job['id']}", f"/api/runner/jobs/{job['id']}/events"):
        r = bob.get(path)
        assert r.status_code == 404
        assert r.json() == {"detail": f"job {job['id']} not found", "code": "not_found"}
    assert bob.post(f"/api/runner/jobs/{job['id']}/cancel").status_code == 404
    assert bob.get("/api/runner/jobs").json()["total"] == 0
    assert api.client(api.admin).get(f"/api/runner/jobs/{job['id']}").status_code == 200
    assert api.client(api.admin).get("/api/runner/jobs").json()["total"] == 1


def test_list_filters_and_pagination(api: Any) -> None:
    ids = [api.create(api.alice).json()["id"] for _ in range(7)]
    other = api.create(api.alice, {"repo": "other", "script_key": "echo", "args": {"message": "x"}}).json()
    api.client(api.alice).post(f"/api/runner/jobs/{ids[0]}/cancel")
    c = api.client(api.alice)
    page1 = c.get("/api/runner/jobs", params={"limit": 3}).json()
    page2 = c.get("/api/runner/jobs", params={"limit": 3, "offset": 3}).json()
    page3 = c.get("/api/runner/jobs", params={"limit": 3, "offset": 6}).json()
    seen = [j["id"] for p in (page1, page2, page3) for j in p["items"]]
    assert page1["total"] == 8 and len(seen) == 8 and len(set(seen)) == 8
    assert seen[0] == other["id"]  # newest first
    assert seen[-1] == ids[0]
    canceled = c.get("/api/runner/jobs", params={"status": "canceled"}).json()
    assert canceled["total"] == 1 and canceled["items"][0]["id"] == ids[0]
    both = c.get("/api/runner/jobs", params=[("status", "canceled"), ("status", "queued")]).json()
    assert both["total"] == 8
    by_repo = c.get("/api/runner/jobs", params={"repo_id": other["repo_id"]}).json()
    assert [j["id"] for j in by_repo["items"]] == [other["id"]]
    for bad in ({"limit": 0}, {"limit": 201}, {"offset": -1}, {"status": "nope"}):
        r = c.get("/api/runner/jobs", params=bad)
        assert r.status_code == 400 and r.json()["code"] == "invalid_request", bad


def test_ids_in_capitals_name_the_same_job_and_repo(api: Any) -> None:
    """A create takes a repo id in capitals; the reads did not: the list filtered by it found
    nothing and the job's routes answered 404 for its id in capitals."""
    job = api.create(api.alice).json()
    upper = job["id"].upper()
    c = api.client(api.alice)
    assert c.get(f"/api/runner/jobs/{upper}").json()["id"] == job["id"]
    assert c.get(f"/api/runner/jobs/{upper}/events").json()["items"][0]["event_type"] == "job_created"
    assert c.get(f"/api/runner/jobs/{upper}/logs").json()["job_id"] == job["id"]
    listed = c.get("/api/runner/jobs", params={"repo_id": job["repo_id"].upper()}).json()
    assert [j["id"] for j in listed["items"]] == [job["id"]] and listed["total"] == 1
    assert api.client(api.bob).get(f"/api/runner/jobs/{upper}").status_code == 404  # still alice's
    r = c.post(f"/api/runner/jobs/{upper}/cancel")
    assert r.status_code == 200 and r.json()["id"] == job["id"] and r.json()["status"] == "canceled"


def test_cancel_codes(api: Any) -> None:
    job = api.create(api.alice).json()
    c = api.client(api.alice)
    r = c.post(f"/api/runner/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert r.json()["error_code"] == "canceled"
    # As a job canceled while running says of the stages it did not reach: none will run.
    assert r.json()["error_message"] == "canceled while queued"
    assert [s["status"] for s in r.json()["stages"]] == ["skipped"] * 5
    assert c.get(f"/api/runner/jobs/{job['id']}").json()["stages"] == r.json()["stages"]
    r = c.post(f"/api/runner/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and r.json()["code"] == "invalid_transition"
    events_ = c.get(f"/api/runner/jobs/{job['id']}/events").json()["items"]
    assert [e["event_type"] for e in events_] == ["job_created", "job_canceled"]


def test_cancel_running_answers_202(api: Any) -> None:
    from codex_runner.jobs import Status

    job = api.create(api.alice).json()
    claimed = api.runtime.jobs.claim("r1", slots=1, max_jobs_per_user=3)
    assert claimed[0].id == job["id"]
    c = api.client(api.alice)
    r = c.post(f"/api/runner/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancel_requested"
    assert r.json()["cancel_requested_at"] is not None
    r = c.post(f"/api/runner/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancel_requested"
    assert api.runtime.jobs.get(job["id"])["status"] == Status.CANCEL_REQUESTED


def test_concurrent_cancels_of_a_running_job_all_answer_202(api: Any) -> None:
    """A double click, a client's retry: every cancel of a running job answers 202 (SPEC §4), also
    on PostgreSQL, where nothing but the row lock orders two cancels' read and compare-and-set."""
    for _ in range(3):
        job = api.create(api.alice).json()
        assert [c.id for c in api.runtime.jobs.claim("r1", slots=1, max_jobs_per_user=100)] == [job["id"]]

        def cancel(_: int, job_id: str = job["id"]) -> int:
            return int(api.client(api.alice).post(f"/api/runner/jobs/{job_id}/cancel").status_code)

        with cf.ThreadPoolExecutor(8) as pool:
            assert sorted(pool.map(cancel, range(8))) == [202] * 8
        assert api.runtime.jobs.get(job["id"])["status"] == "cancel_requested"


def test_a_cancel_that_meets_a_claim_in_progress_waits_for_it(api: Any) -> None:
    """A claim has the queued job's row (and moves it to running) when the cancel reads it: the
    cancel must see the claim's outcome, not answer 409 and leave the job running."""
    import threading
    import time

    job = api.create(api.alice).json()
    answers: list[httpx.Response] = []
    with api.runtime.engine.connect() as conn:
        with conn.begin():
            if api.runtime.engine.dialect.name == "postgresql":
                conn.execute(sa.select(jobs.c.id).where(jobs.c.id == job["id"]).with_for_update())
            conn.execute(jobs.update().where(jobs.c.id == job["id"]).values(status="running"))
            canceller = threading.Thread(
                target=lambda: answers.append(
                    api.client(api.alice).post(f"/api/runner/jobs/{job['id']}/cancel")
                )
            )
            canceller.start()
            time.sleep(0.3)  # the cancel is waiting for the row (PostgreSQL) or the write lock (SQLite)
        canceller.join(timeout=30)
    assert not canceller.is_alive()
    assert answers[0].status_code == 202, answers[0].text
    assert api.runtime.jobs.get(job["id"])["status"] == "cancel_requested"


def test_the_repo_filter_takes_a_repo_name_as_a_create_does(api: Any) -> None:
    """`repo_id=demo` (the name from runner.toml, what a create's `repo` takes) answered an empty
    list: the filter compared it with ids alone. A configured name now filters by its repo; a
    value that is neither a name nor an id answers 400 saying what the filter takes, instead of
    an empty list; an id no repo has now (one removed from runner.toml) still finds its jobs."""
    demo = api.create(api.alice).json()
    other = api.create(api.alice, {"repo": "other", "script_key": "echo", "args": {"message": "x"}}).json()
    c = api.client(api.alice)
    for value in ("demo", demo["repo_id"], demo["repo_id"].upper()):
        listed = c.get("/api/runner/jobs", params={"repo_id": value}).json()
        assert [j["id"] for j in listed["items"]] == [demo["id"]] and listed["total"] == 1, value
    listed = c.get("/api/runner/jobs", params={"repo_id": "other"}).json()
    assert [j["id"] for j in listed["items"]] == [other["id"]]
    assert c.get("/api/runner/jobs", params={"repo_id": "off"}).json()["total"] == 0  # disabled: known
    assert api.client(api.bob).get("/api/runner/jobs", params={"repo_id": "demo"}).json()["total"] == 0
    r = c.get("/api/runner/jobs", params={"repo_id": "Demo"})  # names are exact, as in a create
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == "invalid_request"
    assert body["detail"] == (
        "unknown repo 'Demo': repo_id takes a repo's id or its name (GET /api/runner/repos)"
    )
    assert body["errors"] == [{"loc": ["query", "repo_id"], "msg": "unknown repo"}]
    gone = c.get("/api/runner/jobs", params={"repo_id": "0b7c3f4e-1111-4222-8333-444455556666"})
    assert gone.status_code == 200 and gone.json()["total"] == 0


def test_a_nul_in_a_job_id_or_repo_filter_is_not_found(api: Any) -> None:
    """PostgreSQL text cannot hold NUL: such a job id answers like any unknown one, and such a
    repo filter like any value that is neither a repo id nor a name (400); never a 500."""
    c = api.client(api.alice)
    for path in ("/api/runner/jobs/a%00b", "/api/runner/jobs/a%00b/events", "/api/runner/jobs/a%00b/logs"):
        r = c.get(path)
        assert r.status_code == 404 and r.json()["code"] == "not_found", (path, r.text)
    r = c.post("/api/runner/jobs/a%00b/cancel")
    assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
    r = c.get("/api/runner/jobs", params={"repo_id": "a\x00b"})  # neither an id nor a repo name
    assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text


def test_idempotent_replay_and_conflict(api: Any) -> None:
    first = api.create(api.alice, None, **{"Idempotency-Key": "k-1"})
    assert first.status_code == 201
    again = api.create(api.alice, None, **{"Idempotency-Key": "k-1"})
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["deduplicated"] is True
    # Same payload with a default spelled out is the same canonical payload.
    explicit = {"repo": "demo", "script_key": "echo", "args": {"message": "hi", "count": 1}}
    assert api.create(api.alice, explicit, **{"Idempotency-Key": "k-1"}).status_code == 200
    other = {"repo": "demo", "script_key": "echo", "args": {"message": "different"}}
    r = api.create(api.alice, other, **{"Idempotency-Key": "k-1"})
    assert r.status_code == 409
    assert r.json()["code"] == "idempotency_key_reused_with_different_payload"
    # The scope is (user, key): bob's k-1 is another key.
    assert api.create(api.bob, None, **{"Idempotency-Key": "k-1"}).status_code == 201
    assert _count(api, jobs) == 2
    # The creation event names the key and the payload by their hashes, each by its own (the key's
    # was the payload's hash under the key's name).
    created = api.client(api.alice).get(f"/api/runner/jobs/{first.json()['id']}/events").json()["items"][0]
    assert created["meta"]["idempotency_key_sha256"] == hashlib.sha256(b"k-1").hexdigest()[:16]
    # `count` is left out as it equals its default (SPEC §4's canonical payload).
    payload = payload_hash(first.json()["repo_id"], "echo", {"message": "hi"})
    assert created["meta"]["payload_sha256"] == payload[:16]


def test_idempotency_key_validation(api: Any) -> None:
    for bad in ("", "x" * 256, "caf\u00e9", "tab\there"):
        r = api.client(api.alice).post(
            "/api/runner/jobs",
            json={"repo": "demo", "script_key": "echo", "args": {"message": "hi"}},
            headers={"Idempotency-Key": bad.encode("utf-8")},  # type: ignore[dict-item]
        )
        assert r.status_code == 400, bad
        assert r.json()["code"] == "invalid_request"
    assert _count(api, jobs) == 0


def _create_raw(api: Any, key_field: bytes) -> tuple[int, dict[str, Any]]:
    """A create whose `Idempotency-Key` line is sent as given: httpx (h11) refuses to send a value
    with surrounding blanks, which other clients and proxies do send."""
    import json

    from tests.helpers import connect_to, read_until_closed

    body = json.dumps({"repo": "demo", "script_key": "echo", "args": {"message": "hi"}}).encode()
    head = (
        f"POST /api/runner/jobs HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {api.alice}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    ).encode()
    with connect_to(api.url, timeout=10) as sock:
        sock.sendall(head + b"Idempotency-Key:" + key_field + b"\r\n\r\n" + body)
        answer = read_until_closed(sock)
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def test_blanks_around_an_idempotency_key_are_not_part_of_it(api: Any) -> None:
    """RFC 9110 §5.5: a field value excludes the blanks around it. The server kept trailing ones
    (the leading ones were dropped by the parser), so `k ` made a second job beside `k`'s."""
    status, first = _create_raw(api, b" blank-key")
    assert status == 201, first
    for field in (b"blank-key", b"blank-key  ", b"\tblank-key\t "):
        status, again = _create_raw(api, field)
        assert (status, again["id"], again["deduplicated"]) == (200, first["id"], True), (field, again)
    status, empty = _create_raw(api, b"   ")
    assert status == 400 and empty["code"] == "invalid_request", empty
    assert _count(api, jobs) == 1


def test_idempotency_race_creates_one_job(api: Any) -> None:
    body = {"repo": "demo", "script_key": "echo", "args": {"message": "race"}}

    def one(_: int) -> tuple[int, str, bool]:
        r = api.create(api.alice, body, **{"Idempotency-Key": "race-key"})
        return r.status_code, r.json()["id"], r.json()["deduplicated"]

    with cf.ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(one, range(50)))
    codes = sorted(code for code, _, _ in results)
    assert codes.count(201) == 1 and codes.count(200) == 49, codes
    assert len({jid for _, jid, _ in results}) == 1
    assert sum(1 for _, _, dedup in results if dedup) == 49
    assert _count(api, jobs) == 1
    assert _count(api, idempotency_keys) == 1


def test_queue_full_global_and_per_user(api_factory: Any) -> None:
    api = api_factory(RUNNER_MAX_QUEUE_SIZE="5", RUNNER_MAX_QUEUED_PER_USER="3")
    for _ in range(3):
        assert api.create(api.alice).status_code == 201
    r = api.create(api.alice)
    assert r.status_code == 429 and r.json()["code"] == "user_queue_full"
    assert int(r.headers["Retry-After"]) > 0
    assert api.create(api.bob).status_code == 201
    assert api.create(api.bob).status_code == 201
    r = api.create(api.bob)
    assert r.status_code == 429 and r.json()["code"] == "queue_full"
    assert int(r.headers["Retry-After"]) > 0
    assert _count(api, jobs) == 5


def test_bad_requests_write_nothing(api: Any) -> None:
    c = api.client(api.alice)
    cases: list[tuple[Any, int, str]] = [
        (b"{not json", 400, "invalid_request"),
        ({"repo": "demo", "script_key": "echo", "args": []}, 400, "invalid_request"),
        ({"repo": "demo", "script_key": 5, "args": {}}, 400, "invalid_request"),
        ({"script_key": "echo", "args": {"message": "x"}}, 400, "invalid_request"),
        (
            {"repo": "demo", "script_key": "echo", "args": {"message": "x"}, "extra": 1},
            400,
            "invalid_request",
        ),
        ({"repo": "nope", "script_key": "echo", "args": {"message": "x"}}, 400, "invalid_request"),
        ({"repo": "demo", "script_key": "nope", "args": {}}, 400, "unknown_script"),
        ({"repo": "demo", "script_key": "echo", "args": {}}, 400, "invalid_args"),
        ({"repo": "demo", "script_key": "echo", "args": {"message": "x", "bogus": 1}}, 400, "invalid_args"),
        ({"repo": "demo", "script_key": "echo", "args": {"message": "x", "count": 11}}, 400, "invalid_args"),
        ({"repo": "demo", "script_key": "echo", "args": {"message": "x", "count": "3"}}, 400, "invalid_args"),
        (
            {"repo": "demo", "script_key": "echo", "args": {"message": "x", "loud": "yes"}},
            400,
            "invalid_args",
        ),
        (
            {"repo": "demo", "script_key": "echo", "args": {"message": "x", "mode": "warp"}},
            400,
            "invalid_args",
        ),
        ({"repo": "demo", "script_key": "echo", "args": {"message": "x" * 101}}, 400, "invalid_args"),
        ({"repo": "off", "script_key": "echo", "args": {"message": "x"}}, 403, "repo_disabled"),
        ({"repo": "outside", "script_key": "echo", "args": {"message": "x"}}, 403, "repo_not_allowed"),
        ({"repo": "other", "script_key": "only_demo", "args": {}}, 403, "forbidden"),
    ]
    for body, status, code in cases:
        if isinstance(body, bytes):
            r = c.post("/api/runner/jobs", content=body, headers={"content-type": "application/json"})
        else:
            r = c.post("/api/runner/jobs", json=body)
        assert r.status_code == status, (body, r.text)
        payload = r.json()
        assert payload["code"] == code, (body, payload)
        assert isinstance(payload["detail"], str) and payload["detail"]
        assert "Traceback" not in r.text
    bad_args = c.post("/api/runner/jobs", json={"repo": "demo", "script_key": "echo", "args": {}}).json()
    assert bad_args["errors"] and bad_args["errors"][0]["loc"][-1] == "message"
    assert _count(api, jobs) == 0
    assert _count(api, events) == 0


def test_huge_body_is_413(api: Any) -> None:
    c = api.client(api.alice)
    big = {"repo": "demo", "script_key": "echo", "args": {"message": "x" * (1024 * 1024 + 10)}}
    r = c.post("/api/runner/jobs", json=big)
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"

    def chunks() -> Any:
        for _ in range(40):
            yield b" " * 65536

    r = c.post("/api/runner/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert _count(api, jobs) == 0


def test_auth_on_every_route(api: Any) -> None:
    job = api.create(api.alice).json()
    revoked, record = api.runtime.tokens.create("carol", "user")
    api.runtime.tokens.revoke(record["id"])
    routes = [
        ("GET", "/api/runner/repos"),
        ("GET", "/api/runner/scripts"),
        ("POST", "/api/runner/jobs"),
        ("GET", "/api/runner/jobs"),
        ("GET", f"/api/runner/jobs/{job['id']}"),
        ("POST", f"/api/runner/jobs/{job['id']}/cancel"),
        ("GET", f"/api/runner/jobs/{job['id']}/events"),
        ("GET", f"/api/runner/jobs/{job['id']}/logs"),
        ("GET", "/api/runner/diagnostics"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
    ]
    headers_cases = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer cr_wrong"},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": f"Bearer {revoked}"},
    ]
    c = api.client()
    for method, path in routes:
        for headers in headers_cases:
            r = c.request(method, path, headers=headers, json={} if method == "POST" else None)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json()["code"] == "not_authenticated"
    user = api.client(api.alice)
    for path in ("/api/runner/diagnostics", "/metrics"):
        r = user.get(path)
        assert r.status_code == 403 and r.json()["code"] == "forbidden"
    admin = api.client(api.admin)
    assert admin.get("/api/runner/diagnostics").status_code == 200
    assert admin.get("/metrics").status_code == 200
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/readyz").status_code == 200


def test_jwt_tokens(api_factory: Any) -> None:
    api = api_factory(RUNNER_JWT_SECRET="a-jwt-secret-of-enough-length-123")
    good = jwt.encode({"sub": "dave"}, "a-jwt-secret-of-enough-length-123", algorithm="HS256")
    r = api.create(good)
    assert r.status_code == 201 and r.json()["requested_by"] == "dave"
    forged = jwt.encode({"sub": "dave"}, "another-secret-of-enough-length-12", algorithm="HS256")
    assert api.create(forged).status_code == 401
    none_alg = jwt.encode({"sub": "dave"}, key=None, algorithm="none")  # type: ignore[arg-type]
    assert api.create(none_alg).status_code == 401
    expired = jwt.encode({"sub": "dave", "exp": 1}, "a-jwt-secret-of-enough-length-123", algorithm="HS256")
    assert api.create(expired).status_code == 401


def test_jwt_sub_must_be_a_valid_user(api_factory: Any) -> None:
    """A JWT `sub` follows the rule of `tokens create` (1-200 printable characters): one outside it
    is refused as bad claims, on the create fast path and the other routes alike, and never reaches
    the database (PostgreSQL refuses NUL in text: that was a 500)."""
    secret = "a-jwt-secret-of-enough-length-123"
    api = api_factory(RUNNER_JWT_SECRET=secret)
    for sub in ("u" * 201, "u" * 300, "a\x00b", "tab\there", "\ud800", "", 42, ["alice"]):
        token = jwt.encode({"sub": sub}, secret, algorithm="HS256")
        for r in (api.create(token), api.client(token).get("/api/runner/jobs")):
            assert r.status_code == 401, (sub, r.status_code, r.text)
            assert r.json()["code"] == "not_authenticated"
            if isinstance(sub, str):  # PyJWT itself refuses a `sub` that is not a string
                assert r.json()["detail"] == "invalid token claims"
    longest = jwt.encode({"sub": "u" * 200}, secret, algorithm="HS256")
    r = api.create(longest)
    assert r.status_code == 201 and r.json()["requested_by"] == "u" * 200
    assert api.client(longest).get("/api/runner/jobs").json()["total"] == 1


def test_no_user_takes_the_name_of_the_system_or_the_cli(api_factory: Any) -> None:
    """An event's or audit line's actor is a user, `system` (the runner) or `cli:<login>` (an admin
    command). A token or JWT for user `system` made its cancels read as the runner's own, and one for
    `cli:root` as an operator's command: the audit trail could be forged from the API."""
    secret = "a-jwt-secret-of-enough-length-123"
    api = api_factory(RUNNER_JWT_SECRET=secret)
    job = api.create(api.alice).json()
    for sub in ("system", "System", "cli:root"):
        token = jwt.encode({"sub": sub, "role": "admin"}, secret, algorithm="HS256")
        r = api.client(token).post(f"/api/runner/jobs/{job['id']}/cancel")
        assert r.status_code == 401 and r.json()["detail"] == "invalid token claims", (sub, r.text)
        with pytest.raises(InvalidRequest):
            api.runtime.tokens.create(sub, "admin")
    events = api.client(api.admin).get(f"/api/runner/jobs/{job['id']}/events").json()["items"]
    assert [e["event_type"] for e in events] == ["job_created"]


def test_openapi_needs_auth_and_viewers_are_off(api: Any) -> None:
    """SPEC §4: only the health routes answer without a token, the API description included; the
    HTML viewers, which would fetch it without one, are not served at all."""
    anonymous = api.client()
    r = anonymous.get("/openapi.json")
    assert r.status_code == 401 and r.json()["code"] == "not_authenticated"
    assert "paths" not in r.text
    alice = api.client(api.alice)
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        for client in (anonymous, alice):
            r = client.get(path)
            assert r.status_code == 404 and r.json()["code"] == "not_found", path
    spec = alice.get("/openapi.json").json()
    assert "/api/runner/jobs" in spec["paths"] and "/openapi.json" not in spec["paths"]


def test_catalog_routes(api: Any) -> None:
    c = api.client(api.alice)
    repos = c.get("/api/runner/repos").json()["items"]
    names = {r["name"] for r in repos}
    assert "demo" in names and "off" not in names
    demo = next(r for r in repos if r["name"] == "demo")
    assert set(demo) >= {"id", "name", "source_type", "path_or_url", "branch", "workspace", "enabled"}
    assert demo["source_type"] == "local_path" and demo["workspace"] == "worktree"
    scripts = {s["key"]: s for s in c.get("/api/runner/scripts").json()["items"]}
    echo = scripts["echo"]
    assert echo["timeout_seconds"] == 60
    args = {a["name"]: a for a in echo["args"]}
    assert args["count"]["min"] == 1 and args["count"]["max"] == 10 and args["count"]["default"] == 1
    assert args["mode"]["choices"] == ["fast", "slow"]
    assert args["message"]["required"] is True and args["message"]["max_length"] == 100
    # by repo_id as well as by name
    r = api.create(api.alice, {"repo_id": demo["id"], "script_key": "echo", "args": {"message": "x"}})
    assert r.status_code == 201 and r.json()["repo"] == "demo"


def test_openapi_documents_codes(api: Any) -> None:
    with warnings.catch_warnings():
        # FastAPI warns, and serves the document anyway, when two operations share an id.
        warnings.simplefilter("error")
        spec = api.client(api.alice).get("/openapi.json").json()
    operation_ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
    assert len(operation_ids) == len(set(operation_ids)), operation_ids
    assert {"get", "head"} <= set(spec["paths"]["/healthz"]) and {"get", "head"} <= set(
        spec["paths"]["/readyz"]
    )
    create = spec["paths"]["/api/runner/jobs"]["post"]["responses"]
    for code in ("200", "201", "400", "401", "403", "409", "413", "429", "503"):
        assert code in create, code
    cancel = spec["paths"]["/api/runner/jobs/{job_id}/cancel"]["post"]["responses"]
    for code in ("200", "202", "404", "409"):
        assert code in cancel


def test_openapi_documents_auth_and_media_types_as_answered(api: Any) -> None:
    """The document named no security scheme (a generated client sent no token), filed the JSON
    error bodies of `/metrics` under `text/plain` and of the log stream under `application/json`
    like its events, and gave the create's 200 and the cancel's 202 no body."""
    spec = api.client(api.alice).get("/openapi.json").json()
    bearer = spec["components"]["securitySchemes"]["bearer"]
    assert bearer["type"] == "http" and bearer["scheme"] == "bearer"
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            open_route = path in ("/healthz", "/readyz")
            assert op.get("security") == (None if open_route else [{"bearer": []}]), (method, path)
            for code, response in op["responses"].items():
                if code[0] in "45":
                    assert list(response["content"]) == ["application/json"], (method, path, code)
    stream = spec["paths"]["/api/runner/jobs/{job_id}/logs/stream"]["get"]["responses"]
    assert list(stream["200"]["content"]) == ["text/event-stream"]
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert "application/json" in spec["paths"]["/api/runner/jobs"]["post"]["responses"]["200"]["content"]
    cancel = spec["paths"]["/api/runner/jobs/{job_id}/cancel"]["post"]["responses"]
    assert "application/json" in cancel["202"]["content"]


def test_a_queued_cancel_is_logged_as_a_terminal_transition(api: Any) -> None:
    """SPEC §8: every terminal transition is a service log line with its five fields; a queued
    job's cancel is one that no launcher sees."""
    from structlog.testing import capture_logs

    job = api.create(api.alice).json()
    with capture_logs() as logs:
        assert api.client(api.alice).post(f"/api/runner/jobs/{job['id']}/cancel").status_code == 200
    finished = [e for e in logs if e.get("event") == "job_finished"]
    assert len(finished) == 1, logs
    entry = finished[0]
    assert entry["job_id"] == job["id"] and entry["script_key"] == job["script_key"]
    assert (entry["status_from"], entry["status_to"]) == ("queued", "canceled")
    assert "duration_ms" in entry and entry["duration_ms"] is None


def _documented_fields() -> dict[str, set[str]]:
    """docs/api.md, "Objects": each object's field names (what brackets say about a field aside)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    section = text.split("## Objects", 1)[1].split("\n## ", 1)[0]
    found: dict[str, set[str]] = {}
    for name, body in re.findall(r"^- \*\*(\w+)\*\*[^:]*:(.*?)(?=^- \*\*|\Z)", section, re.M | re.S):
        body = re.sub(r"\([^()]*\)", "", body.split("**argument**")[0])
        found[name] = set(re.findall(r"`(\w+)`", body))
    argument = section.split("**argument**:", 1)[1]
    found["argument"] = set(re.findall(r"`(\w+)`", argument))
    return found


def test_the_objects_have_the_fields_docs_api_md_lists(api: Any) -> None:
    """A field added, renamed or dropped on one side only fails here, not in a client."""
    docs = _documented_fields()
    created = api.create(api.alice).json()
    c = api.client(api.alice)
    got = c.get(f"/api/runner/jobs/{created['id']}").json()
    assert set(created) | set(got) == docs["job"]
    for stage in got["stages"]:
        assert set(stage) | {"error"} == docs["stage"]  # `error`: a failed stage only
    assert set(got["events"][0]) == docs["event"]
    repo = c.get("/api/runner/repos").json()["items"][0]
    assert set(repo) == docs["repo"]
    script = next(s for s in c.get("/api/runner/scripts").json()["items"] if s["key"] == "echo")
    assert set(script) == docs["script"]
    assert all(set(arg) == docs["argument"] for arg in script["args"])


def test_a_create_with_thousands_of_unknown_fields_gets_a_short_answer(api: Any) -> None:
    """Found by tests/api/test_api_fuzz.py: every unknown top-level field of a create's body was
    listed in the 400's `errors`, so 430 KB of them made an answer of 2.6 MB (and a 1 MiB body,
    six times that). As for unknown args, the first 20 are named and the rest counted."""
    body: dict[str, Any] = {"repo": "demo", "script_key": "echo", "args": {"message": "x"}}
    body.update({f"k{i}": 0 for i in range(5000)})
    r = api.client(api.alice).post("/api/runner/jobs", json=body)
    assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text[:300]
    errors = r.json()["errors"]
    assert len(errors) == 21 and len(r.content) < 4096, len(r.content)
    assert errors[0] == {"loc": ["body", "k0"], "msg": "Extra inputs are not permitted"}
    assert errors[-1] == {"loc": ["body"], "msg": "and 4980 more errors"}
    assert _count(api, jobs) == 0
