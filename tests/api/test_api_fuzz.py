"""Property-based fuzzing of the HTTP API against a real server (the `api` fixture: uvicorn on
loopback, SQLite and PostgreSQL): hostile but plausible creates, list queries and job paths.

Invariants, whatever is sent: never a 5xx; every error is docs/api.md's JSON (`detail`, `code`)
with a status and code the docs give; no answer echoes a token; a user never sees or cancels
another user's job (404); a refused create writes no job row; an accepted one reads back with the
values sent. One server per test function (per backend), many examples against it."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import hashlib
import hmac
import json
import math
import os
import urllib.parse
import uuid
from typing import Any

import httpx
import jwt
import sqlalchemy as sa
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from codex_runner.catalog.specs import REPO_NAMESPACE
from codex_runner.secrets import generate_key
from codex_runner.store.schema import jobs

#: docs/api.md, "Errors": the codes each status may carry.
DOCUMENTED: dict[int, set[str]] = {
    400: {"invalid_request", "invalid_args", "unknown_script"},
    401: {"not_authenticated"},
    403: {"forbidden", "repo_not_allowed", "repo_disabled"},
    404: {"not_found"},
    405: {"method_not_allowed"},
    409: {"invalid_transition", "idempotency_key_reused_with_different_payload", "log_not_here"},
    413: {"payload_too_large"},
    429: {"queue_full", "user_queue_full", "too_many_streams"},
}
#: FUZZ_EXAMPLES=1000 for a longer hunt; the default keeps the file near 25 s per backend.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: For the examples that send a dozen requests at once.
FEW = settings(SETTINGS, max_examples=max(1, EXAMPLES // 4))
DEMO_ID = str(uuid.uuid5(REPO_NAMESPACE, "demo"))
DEFAULTS = {"count": 1, "loud": False, "mode": "fast"}
JWT_SECRET = "fuzz-jwt-secret-0123456789abcdef0123456789"
ENCRYPTION_KEY = generate_key()
STORED_SECRET = "ghp_FuzzStoredSecret0123456789abcdefABCD"

# --- values -------------------------------------------------------------------------------------

hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x1F), max_size=10),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "a\x00b",
            "-x",
            "--count",
            "демо",
            "😀" * 30,
            "demo ",
            " demo",
            "DEMO",
            "echo\n",
            "x" * 100,
            "x" * 101,
            "x" * 5000,
            "é" * 100,
            DEMO_ID,
            DEMO_ID.upper(),
            "../../etc/passwd",
            "%00",
            "{message}",
            "\ud800",
            "x\udfffy",
        ]
    ),
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=12),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, 10, 11, -1, 2**63 - 1, 2**63, -(2**63), 10**40, 1.0, 1.5, -0.0, 1e308]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, hostile_text)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(hostile_text, inner, max_size=4)),
    max_leaves=12,
)
# Each field: a plausible value most of the time, anything else otherwise.


def mostly(plausible: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A plausible value five times in six: a create then fails on one field at a time, often
    enough for the accepted ones (and the model's agreement on them) to be tested too."""
    return st.integers(0, 5).flatmap(lambda n: hostile if n == 0 else plausible)


MISSING = object()
message = mostly(st.text(alphabet="abc é😀{}", max_size=8), st.one_of(hostile_text, json_values))
count = mostly(st.integers(min_value=0, max_value=11), st.one_of(numbers, json_values))
loud = mostly(st.booleans(), st.one_of(st.sampled_from(["true", 0, 1, None]), json_values))
mode = mostly(st.sampled_from(["fast", "slow"]), st.one_of(st.sampled_from(["FAST", "", None]), json_values))


def maybe(strategy: st.SearchStrategy[Any], present: int = 1) -> st.SearchStrategy[Any]:
    """The field, or not sent (one time in `present + 1`)."""
    return st.integers(0, present).flatmap(lambda n: st.just(MISSING) if n == 0 else strategy)


@st.composite
def args_dicts(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)  # args of the wrong type altogether
    out: dict[str, Any] = {}
    for name, strategy in (("message", message), ("count", count), ("loud", loud), ("mode", mode)):
        value = draw(maybe(strategy, present=5 if name == "message" else 1))
        if value is not MISSING:
            out[name] = value
    if draw(st.integers(0, 4)) == 0:
        out.update(draw(st.dictionaries(hostile_text, json_values, min_size=1, max_size=2)))
    return out


@st.composite
def create_bodies(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)  # not an object, or an object of anything
    body: dict[str, Any] = {}
    fields = (
        (
            "repo",
            mostly(
                st.sampled_from(["demo", "other"]),
                st.one_of(st.sampled_from(["off", "outside", "nope"]), hostile_text, json_values),
            ),
            3,
        ),
        (
            "repo_id",
            mostly(st.sampled_from([DEMO_ID, DEMO_ID.upper()]), st.one_of(hostile_text, json_values)),
            0,
        ),
        (
            "script_key",
            mostly(
                st.sampled_from(["echo", "echo", "only_demo"]),
                st.one_of(st.just("Echo"), hostile_text, json_values),
            ),
            5,
        ),
        ("args", args_dicts(), 5),
    )
    for name, strategy, present in fields:
        value = draw(
            maybe(strategy, present) if present else st.one_of(st.just(MISSING), st.just(MISSING), strategy)
        )
        if value is not MISSING:
            body[name] = value
    extra = draw(st.integers(0, 9))
    if extra == 0:
        body.update(draw(st.dictionaries(hostile_text, json_values, min_size=1, max_size=1)))
    elif extra == 1:
        # Many unknown fields, at the top or among the args: the answer must stay small.
        many = {f"x{i}": 0 for i in range(draw(st.integers(1, 3000)))}
        if draw(st.booleans()) and isinstance(body.get("args"), dict):
            body["args"].update(many)
        else:
            body.update(many)
    return body


RAW_BODIES = [
    b"",
    b"{",
    b"null",
    b"[]",
    b'"demo"',
    b"{}",
    b'{"repo": "demo", "script_key": "echo", "args": {"message": NaN}}',
    b'{"repo": "demo", "script_key": "echo", "args": {"message": "hi", "count": Infinity}}',
    b'{"repo": "demo", "script_key": "echo", "args": {"message": "hi", "count": 1e400}}',
    b'{"repo": "demo", "script_key": "echo", "args": {"message": "\\ud800"}}',
    b'{"repo": "demo", "script_key": "echo", "args": {"\\udfff": 1, "message": "hi"}}',
    b'{"repo": "demo", "script_key": "echo", "args": {"message": "\\u0000"}}',
    b'{"repo": "demo", "repo": "other", "script_key": "echo", "args": {"message": "hi"}}',
    b'{"repo": "demo", "script_key": "echo", "args": {"message": "hi", "count": 1' + b"0" * 5000 + b"}}",
    b'{"repo": "demo", "script_key": "echo", "args": {"message": "hi"}, "x": '
    + b"[" * 5000
    + b"]" * 5000
    + b"}",
    b'{"repo": "demo", "script_key": "echo", "args": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}",
    b'{"repo": "demo", "script_key": "echo", "args": {"message": "\xff\xfe"}}',
    b"\xef\xbb\xbf{}",
    # Over RUNNER_MAX_REQUEST_BYTES (1 MiB): 413.
    b'{"repo": "demo", "script_key": "echo", "args": {"message": "' + b"x" * (1 << 20) + b'"}}',
]
# Header values an HTTP client sends (h11 refuses blanks around one, and control characters): the
# rest is the server's to judge. DEL and other bytes the parser refuses get uvicorn's plain-text 400
# (docs/api.md), before the app.
idempotency_keys = st.one_of(
    st.none(),
    st.none(),
    st.uuids().map(str),
    st.sampled_from(["", "k", "k k", "k" * 255, "k" * 256, "k" * 5000, "ключ", "😀", "k\tk"]),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=20),
    st.text(alphabet=st.characters(min_codepoint=0xA0, max_codepoint=0x2FFF), min_size=1, max_size=20),
).filter(lambda k: k is None or k == k.strip(" \t"))
content_types = st.sampled_from(
    [
        None,
        "application/json",
        "application/json",
        "application/json",
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/problem+json",
        "",
        "application/json; charset=latin-1",
    ]
)


# --- checks -------------------------------------------------------------------------------------


def check_answer(api: Any, r: httpx.Response, allowed: set[int]) -> Any:
    """The invariants of every answer; its JSON (None for a stream)."""
    event(f"status {r.status_code}")
    assert r.status_code < 500, (r.status_code, r.text[:500])
    assert r.status_code in allowed, (r.status_code, r.text[:500])
    for secret in (api.admin, api.alice, api.bob, JWT_SECRET, ENCRYPTION_KEY, STORED_SECRET):
        assert secret not in r.text
    if r.status_code >= 400:
        body = r.json()
        assert isinstance(body, dict), body
        assert isinstance(body.get("detail"), str) and body["detail"], body
        assert body.get("code") in DOCUMENTED[r.status_code], body
        if "errors" in body:
            assert isinstance(body["errors"], list)
            for item in body["errors"]:
                assert isinstance(item["loc"], list) and isinstance(item["msg"], str), item
        if r.status_code == 429:
            assert r.headers.get("retry-after", "").isdigit()
        return body
    if r.headers.get("content-type", "").startswith("application/json"):
        return r.json()
    return None


def job_rows(api: Any) -> int:
    with api.runtime.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(jobs)).scalar_one())


def expected_args(args: dict[str, Any], script_key: str = "echo") -> dict[str, Any]:
    """What an accepted create stores: what was sent (a JSON null counts as absent), defaults filled."""
    defaults = DEFAULTS if script_key == "echo" else {}
    return {**defaults, **{k: v for k, v in args.items() if v is not None}}


def model_accepts(body: Any) -> bool:
    """An independent reading of the create rules for the echo script (docs/api.md, SPEC §2):
    True when the body must be accepted."""
    if not isinstance(body, dict) or set(body) - {"repo", "repo_id", "script_key", "args"}:
        return False
    repo, repo_id = body.get("repo"), body.get("repo_id")
    if repo is None and repo_id is None:
        return False
    if repo is not None and repo not in ("demo", "other"):
        return False
    if repo_id is not None and (not isinstance(repo_id, str) or repo_id.lower() != DEMO_ID):
        return False
    if repo is not None and repo_id is not None and repo != "demo":
        return False
    args = body.get("args", {})
    if body.get("script_key") == "only_demo":
        # No arguments at all; the script is allowed on `demo` only.
        return args == {} and (repo or "demo") == "demo"
    if body.get("script_key") != "echo":
        return False
    if not isinstance(args, dict) or set(args) - {"message", "count", "loud", "mode"}:
        return False
    m = args.get("message")
    if not isinstance(m, str) or len(m) > 100 or "\x00" in m or m.startswith("-"):
        return False
    if any(0xD800 <= ord(c) <= 0xDFFF for c in m):
        return False
    c = args.get("count")
    if c is not None and (isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 10):
        return False
    lo = args.get("loud")
    if lo is not None and not isinstance(lo, bool):
        return False
    mo = args.get("mode")
    return mo is None or mo in ("fast", "slow")


def post(
    api: Any, client: httpx.Client, content: bytes, ctype: str | None, key: str | None
) -> httpx.Response:
    headers: dict[str, Any] = {}
    if ctype is not None:
        headers["Content-Type"] = ctype
    if key is not None:
        headers["Idempotency-Key"] = key.encode("utf-8")
    return client.post("/api/runner/jobs", content=content, headers=headers)


def query_string(params: list[tuple[str, str]]) -> str:
    # Lone surrogates go out as the bytes Python would give them: invalid UTF-8 in the URL.
    return urllib.parse.urlencode(params, encoding="utf-8", errors="surrogatepass")


def encode(body: Any) -> bytes:
    # Python's own JSON: NaN and Infinity as JS literals, lone surrogates as \u escapes.
    return json.dumps(body).encode()


# --- creates ------------------------------------------------------------------------------------


@SETTINGS
@given(
    body=st.one_of(create_bodies(), st.sampled_from(RAW_BODIES)),
    ctype=content_types,
    key=idempotency_keys,
)
def test_fuzzed_creates_answer_as_documented(
    api_factory: Any, body: Any, ctype: str | None, key: str | None
) -> None:
    api = fuzz_api(api_factory)
    client = api.client(api.alice)
    content = body if isinstance(body, bytes) else encode(body)
    before = job_rows(api)
    r = post(api, client, content, ctype, key)
    answer = check_answer(api, r, {200, 201, 400, 403, 409, 413})
    after = job_rows(api)
    # An error is never much larger than the request: no amplification by listing every problem.
    assert r.status_code < 400 or len(r.content) <= len(content) + 16384, (len(content), len(r.content))
    if r.status_code != 201:
        assert after == before, (r.status_code, answer)
    if r.status_code not in (200, 201):
        return
    assert after == before + (1 if r.status_code == 201 else 0)
    sent = json.loads(content)
    assert answer["requested_by"] == "alice" and answer["status"] == "queued"
    assert answer["script_key"] == sent["script_key"]
    assert answer["args"] == expected_args(sent.get("args", {}), sent["script_key"]), (sent, answer["args"])
    if "repo" in sent and sent["repo"] is not None:
        assert answer["repo"] == sent["repo"]
    if sent.get("repo_id") is not None:
        assert answer["repo_id"] == sent["repo_id"].lower()
    again = client.get(f"/api/runner/jobs/{answer['id']}")
    stored = check_answer(api, again, {200})
    for field in ("id", "repo_id", "repo", "script_key", "args", "status", "requested_by", "created_at"):
        assert stored[field] == answer[field], field


@SETTINGS
@given(body=create_bodies())
def test_the_create_rules_match_an_independent_model(api_factory: Any, body: Any) -> None:
    """A body the model accepts is created (201); one it refuses is a 4xx. Plain JSON, no key."""
    api = fuzz_api(api_factory)
    r = post(api, api.client(api.bob), encode(body), "application/json", None)
    check_answer(api, r, {201, 400, 403})
    assert (r.status_code == 201) == model_accepts(body), (body, r.status_code, r.text[:300])


# The same repo named four ways: by name, by id in either case, by both (one payload for all).
REPO_FORMS: list[dict[str, str]] = [
    {"repo": "demo"},
    {"repo_id": DEMO_ID},
    {"repo_id": DEMO_ID.upper()},
    {"repo": "demo", "repo_id": DEMO_ID},
]
valid_bodies = st.builds(
    lambda repo, m, c, lo, mo: {
        **repo,
        "script_key": "echo",
        "args": {
            k: v for k, v in (("message", m), ("count", c), ("loud", lo), ("mode", mo)) if v is not None
        },
    },
    st.sampled_from(REPO_FORMS),
    st.text(alphabet="ab", min_size=1, max_size=3),
    st.one_of(st.none(), st.integers(1, 3)),
    st.one_of(st.none(), st.booleans()),
    st.one_of(st.none(), st.sampled_from(["fast", "slow"])),
)


def canonical(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in expected_args(body["args"]).items() if DEFAULTS.get(k) != v}


@FEW
@given(
    key=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=255),
    first=valid_bodies,
    second=valid_bodies,
)
def test_a_repeated_idempotency_key_replays_or_conflicts(
    api_factory: Any, key: str, first: Any, second: Any
) -> None:
    api = fuzz_api(api_factory)
    client = api.client(api.alice)
    # A key of this example only: earlier examples' keys must not decide this one.
    key = f"{uuid.uuid4().hex[:8]}{key}"[:255]
    a = post(api, client, encode(first), "application/json", key)
    assert check_answer(api, a, {201})["deduplicated"] is False
    rows = job_rows(api)
    b = post(api, client, encode(second), "application/json", key)
    answer = check_answer(api, b, {200, 409})
    assert job_rows(api) == rows
    if canonical(first) == canonical(second):
        assert b.status_code == 200 and answer["id"] == a.json()["id"] and answer["deduplicated"] is True
    else:
        assert answer["code"] == "idempotency_key_reused_with_different_payload", (first, second)
    # Another user's same key is another scope: a job of its own.
    c = post(api, api.client(api.bob), encode(second), "application/json", key)
    assert check_answer(api, c, {201})["requested_by"] == "bob"


invalid_bodies = st.sampled_from(
    [
        {"repo": "demo", "script_key": "echo", "args": {"message": "-x"}},
        {"repo": "nope", "script_key": "echo", "args": {"message": "a"}},
        {"repo": "off", "script_key": "echo", "args": {"message": "a"}},
        {"repo": "demo", "script_key": "echo", "args": {"message": "a", "count": 0}},
    ]
)


@FEW
@given(
    requests=st.lists(
        st.tuples(st.sampled_from(["a", "b", None]), st.one_of(valid_bodies, valid_bodies, invalid_bodies)),
        min_size=2,
        max_size=12,
    )
)
def test_concurrent_creates_are_each_decided_as_if_alone(
    api_factory: Any, requests: list[tuple[str | None, dict[str, Any]]]
) -> None:
    """Creates sent at once share a batch (group commit): per Idempotency-Key one job, the
    requests with its payload answered with it, those with another payload 409; no other row."""
    api = fuzz_api(api_factory)
    scope = uuid.uuid4().hex[:8]  # this example's keys only
    rows = job_rows(api)

    def send(item: tuple[str | None, dict[str, Any]]) -> httpx.Response:
        key, body = item
        with httpx.Client(base_url=api.url, timeout=30) as c:
            headers = {"Authorization": f"Bearer {api.alice}"}
            if key is not None:
                headers["Idempotency-Key"] = f"{scope}-{key}"
            return c.post("/api/runner/jobs", json=body, headers=headers)

    with cf.ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(send, requests))
    created = 0
    for key in ("a", "b", None):
        mine = [(body, r) for (k, body), r in zip(requests, answers, strict=True) if k == key]
        for _, r in mine:
            check_answer(api, r, {200, 201, 400, 403, 409})
        accepted = [(body, r) for body, r in mine if r.status_code in (200, 201)]
        created += sum(r.status_code == 201 for _, r in accepted)
        if key is None:
            assert all(r.status_code != 409 and r.status_code != 200 for _, r in mine)
            continue
        if not accepted:
            assert all(r.status_code in (400, 403) for _, r in mine), [r.text for _, r in mine]
            continue
        # One job for the key: the one 201; every accepted answer is it, with one payload.
        assert [r.status_code for _, r in accepted].count(201) == 1, [(b, r.status_code) for b, r in mine]
        assert len({r.json()["id"] for _, r in accepted}) == 1
        winner = canonical(next(body for body, r in accepted if r.status_code == 201))
        for body, r in mine:
            if r.status_code in (200, 201):
                assert canonical(body) == winner
            elif r.status_code == 409:
                assert canonical(body) != winner, (body, winner)
    assert job_rows(api) == rows + created


QUEUED_PER_USER, QUEUE_SIZE = 3, 5


@FEW
@given(users=st.lists(st.sampled_from(["alice", "bob"]), min_size=1, max_size=12))
def test_concurrent_creates_never_pass_the_queue_caps(api_factory: Any, users: list[str]) -> None:
    """docs/api.md, "Back-pressure": the caps hold under concurrency; a create is refused (429,
    `Retry-After`) only when one of them is reached, so exactly as many are accepted as fit."""
    api = getattr(api_factory, "_caps_api", None)
    if api is None:
        api = api_factory(
            RUNNER_MAX_QUEUE_SIZE=str(QUEUE_SIZE), RUNNER_MAX_QUEUED_PER_USER=str(QUEUED_PER_USER)
        )
        api_factory._caps_api = api
    admin = api.client(api.admin)
    for job in admin.get("/api/runner/jobs", params={"status": "queued", "limit": 200}).json()["items"]:
        assert admin.post(f"/api/runner/jobs/{job['id']}/cancel").status_code == 200
    tokens = {"alice": api.alice, "bob": api.bob}

    def send(user: str) -> httpx.Response:
        with httpx.Client(base_url=api.url, timeout=30) as c:
            body = {"repo": "demo", "script_key": "echo", "args": {"message": user}}
            return c.post("/api/runner/jobs", json=body, headers={"Authorization": f"Bearer {tokens[user]}"})

    with cf.ThreadPoolExecutor(len(users)) as pool:
        answers = list(pool.map(send, users))
    for r in answers:
        check_answer(api, r, {201, 429})
    accepted = {
        u: sum(r.status_code == 201 for v, r in zip(users, answers, strict=True) if v == u) for u in tokens
    }
    fits = min(QUEUE_SIZE, sum(min(users.count(u), QUEUED_PER_USER) for u in tokens))
    assert all(n <= QUEUED_PER_USER for n in accepted.values()), accepted
    assert sum(accepted.values()) == fits, (users, [r.status_code for r in answers])


def fuzz_api(api_factory: Any) -> Any:
    """One server per test function (and backend), started on its first example; the queue caps
    raised so that accepted creates never run into them."""
    cached = getattr(api_factory, "_fuzz_api", None)
    if cached is None:
        cached = api_factory(
            RUNNER_MAX_QUEUE_SIZE="100000",
            RUNNER_MAX_QUEUED_PER_USER="100000",
            RUNNER_JWT_SECRET=JWT_SECRET,
            RUNNER_ENCRYPTION_KEY=ENCRYPTION_KEY,
        )
        # A stored credential, whose secret no answer may carry.
        cached.runtime.credentials.set("fuzz-cred", "git.example.com", "git", STORED_SECRET)
        api_factory._fuzz_api = cached
    return cached


# --- lists --------------------------------------------------------------------------------------

query_values = st.one_of(
    st.integers(min_value=0, max_value=250).map(str),
    st.sampled_from(["queued", "canceled", "running", "demo", "other"]),
    hostile_text,
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(
        [
            "0",
            "1",
            "200",
            "201",
            "-1",
            "10000000",
            "10000001",
            "1e3",
            "1.0",
            " 5",
            "5 ",
            "+5",
            "0x10",
            "٣",
            "²",
            "NaN",
            "inf",
            "",
            "queued",
            "canceled",
            "QUEUED",
            "succeeded",
            "bogus",
            "demo",
            DEMO_ID,
        ]
    ),
)
query_names = st.sampled_from(
    [
        "limit",
        "offset",
        "status",
        "repo_id",
        "limit",
        "offset",
        "status",
        "repo_id",
        "unknown",
        "Limit",
        "status[]",
        "",
    ]
)


@SETTINGS
@given(params=st.lists(st.tuples(query_names, query_values), max_size=6))
def test_fuzzed_list_queries(api_factory: Any, params: list[tuple[str, str]]) -> None:
    api = fuzz_api(api_factory)
    seed_jobs(api)
    r = api.client(api.alice).get(f"/api/runner/jobs?{query_string(params)}")
    body = check_answer(api, r, {200, 400})
    if r.status_code != 200:
        return
    assert 1 <= body["limit"] <= 200 and 0 <= body["offset"] <= 10_000_000
    assert len(body["items"]) <= body["limit"] and body["total"] >= len(body["items"])
    assert all(item["requested_by"] == "alice" for item in body["items"])
    statuses = {v for k, v in params if k == "status"}
    if statuses:
        assert all(item["status"] in statuses for item in body["items"])


def seed_jobs(api: Any) -> dict[str, str]:
    """A queued job each of alice and bob, made once per server."""
    seeded: dict[str, str] | None = getattr(api, "_seeded", None)
    if seeded is None:
        seeded = {}
        for user, token in (("alice", api.alice), ("bob", api.bob)):
            r = api.create(token)
            assert r.status_code == 201, r.text
            seeded[user] = r.json()["id"]
        api._seeded = seeded
    return seeded


# --- job paths ----------------------------------------------------------------------------------

path_ids = st.one_of(
    hostile_text,
    st.uuids().map(str),
    st.sampled_from(
        ["0", "-1", "null", "%00", "a%2Fb", "..", ".", "%2e%2e", "x" * 5000, "'; DROP TABLE jobs;--"]
    ),
)
# With a trailing slash too, as a hand-written URL or a client's path join gives one.
SUFFIXES = ["", "/events", "/logs", "/cancel", "/logs/stream", "/", "/events/", "/cancel/"]


@SETTINGS
@given(
    raw_id=path_ids,
    which=st.sampled_from(["fuzz", "bob", "bob_upper", "alice"]),
    suffix=st.sampled_from(SUFFIXES),
    query=st.lists(st.tuples(st.sampled_from(["offset", "limit", "x"]), query_values), max_size=3),
    last_event_id=st.one_of(
        st.none(), st.sampled_from(["", "0", "12", "-1", "x", "9" * 21, "²", "7 7", "٣"])
    ),
)
def test_fuzzed_job_paths_never_show_another_users_job(
    api_factory: Any,
    raw_id: str,
    which: str,
    suffix: str,
    query: list[tuple[str, str]],
    last_event_id: str | None,
) -> None:
    api = fuzz_api(api_factory)
    seeded = seed_jobs(api)
    bobs = seeded["bob"]
    job_id = {"fuzz": raw_id, "bob": bobs, "bob_upper": bobs.upper(), "alice": seeded["alice"]}[which]
    if which == "alice" and suffix == "/logs/stream":
        return  # her own queued job's stream runs until the job ends, which it never does here
    if not job_id.strip("./"):
        return  # no job id at all: the list route, or a path the URL's dot segments rewrite
    quoted = urllib.parse.quote(job_id.encode("utf-8", "surrogatepass"), safe="%")
    path = f"/api/runner/jobs/{quoted}{suffix}?{query_string(query)}"
    method = "POST" if suffix == "/cancel" else "GET"
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id.encode()}
    client = api.client(api.alice)
    with client.stream(method, path, headers=headers, timeout=10) as r:
        r.read()
        if which == "alice":
            # Her own job: read, or canceled once (then 409), or a bad query; no route with a
            # trailing slash.
            check_answer(api, r, {404} if suffix.endswith("/") else {200, 400, 409})
            return
        # Not alice's job (or none): never a 200 and never a stream.
        check_answer(api, r, {400, 404, 405})
        if which != "fuzz":
            assert r.status_code in (400, 404)
    if which != "fuzz" and r.status_code == 400:
        # Only a bad query or Last-Event-ID may come first; without them, the job is not found.
        again = client.request(method, path.split("?")[0])
        assert check_answer(api, again, {404})["code"] == "not_found"
    # Bob's job is as it was: no cancel of alice's reached it.
    job = api.client(api.bob).get(f"/api/runner/jobs/{bobs}").json()
    assert job["status"] == "queued" and job["cancel_requested_at"] is None


segments = st.one_of(
    st.sampled_from(["api", "runner", "jobs", "repos", "healthz", "logs", "", "", "x"]),
    st.text(alphabet="abcXYZ019-._~:@!$&'()*+,;=", max_size=6),
)


@SETTINGS
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    parts=st.lists(segments, min_size=1, max_size=6),
)
def test_fuzzed_paths_and_methods(api_factory: Any, method: str, parts: list[str]) -> None:
    """Any path, any method: a documented answer; a path no route serves is named as sent."""
    api = fuzz_api(api_factory)
    path = "/" + "/".join(parts)
    assume(path not in ("/api/runner/jobs",) and not path.endswith("/stream"))
    assume(not {".", ".."} & set(parts))  # dot segments: httpx resolves them before sending
    # The path as bytes on the request line: httpx would read `//x` as a host.
    url = httpx.URL(api.url).copy_with(raw_path=path.encode())
    r = api.client(api.alice).request(method, url)
    body = check_answer(api, r, {200, 201, 202, 400, 403, 404, 405, 409})
    if r.status_code == 404 and body["detail"].startswith("no route"):
        assert body["detail"] == f"no route {method} {path}", (path, body)
    if r.status_code == 405:
        assert r.headers["allow"], path


@SETTINGS
@given(
    path=st.sampled_from(
        [
            "/api/runner/diagnostics",
            "/metrics",
            "/openapi.json",
            "/api/runner/repos",
            "/api/runner/scripts",
            "/api/runner/jobs",
            "/readyz",
            "/healthz",
        ]
    ),
    who=st.sampled_from(["admin", "alice"]),
)
def test_no_route_shows_a_secret(api_factory: Any, path: str, who: str) -> None:
    """Admin routes too: the tokens, the JWT and encryption keys and a stored credential's secret
    are in no answer (check_answer), with jobs in the tables and a 405 in the metrics."""
    api = fuzz_api(api_factory)
    seeded = seed_jobs(api)
    api.client(api.admin).post(f"/api/runner/jobs/{seeded['bob']}/events")  # a 405, counted in metrics
    r = api.client(getattr(api, who)).get(path)
    check_answer(api, r, {200, 403} if who == "alice" else {200})


# --- authentication -----------------------------------------------------------------------------

claims = st.dictionaries(
    st.sampled_from(["sub", "role", "exp", "nbf", "iat", "aud", "iss", "x"]),
    st.one_of(
        json_values,
        st.sampled_from(
            [
                "alice",
                "bob",
                "admin",
                "user",
                "system",
                "cli:root",
                "carol",
                "Carol\x00",
                "ſystem",
                "CLI:x",
                " alice",
                "😀" * 200,
                "😀" * 201,
                "x" * 200,
                "\u0130",
                "\ud800",
                "a\u200bb",
            ]
        ),
        st.text(min_size=1, max_size=30),
        st.just(math.inf),
        st.just(math.nan),
        st.integers(min_value=0, max_value=2**64),
    ),
    max_size=5,
)


@st.composite
def authorizations(draw: st.DrawFn, api_tokens: tuple[str, str]) -> str | bytes | None:
    alice, bob = api_tokens
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return None
    if kind == 1:
        token = hs256(draw(claims), JWT_SECRET)
    elif kind == 2:
        wrong = draw(st.sampled_from(["wrong-secret-wrong-secret-wrong-secret", JWT_SECRET[::-1]]))
        token = hs256(draw(claims), wrong)
    elif kind == 3:
        token = draw(
            st.sampled_from([alice, bob, alice.upper(), alice[:-1], alice + "x", "a.b.c", "..", "x" * 5000])
        )
    else:
        token = draw(st.text(min_size=0, max_size=40).filter(lambda t: t == t.strip()))
    scheme = draw(
        st.sampled_from(["Bearer ", "bearer ", "BEARER ", "Bearer  ", "Basic ", "Bearer\t", "", "Token "])
    )
    value = f"{scheme}{token}"
    # What an HTTP client sends at all (h11 refuses blanks around a value and control characters).
    assume(value == value.strip(" \t") and all(c == "\t" or (c >= " " and c != "\x7f") for c in value))
    return value.encode()


def hs256(payload: dict[str, Any], secret: str) -> str:
    """A JWT signed by hand: PyJWT's `encode` refuses claims of the wrong type, a server must not
    trust that every issuer does. Python's JSON writes NaN and Infinity as JS literals."""

    def part(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing = part(b'{"alg":"HS256","typ":"JWT"}') + "." + part(json.dumps(payload).encode())
    signature = hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{part(signature)}"


@SETTINGS
@given(data=st.data(), create=st.booleans())
def test_fuzzed_authorization_headers(api_factory: Any, data: st.DataObject, create: bool) -> None:
    """A caller is who its token or JWT says, or 401 `not_authenticated`: never anyone else."""
    api = fuzz_api(api_factory)
    seed_jobs(api)
    auth = data.draw(authorizations((api.alice, api.bob)))
    headers = {} if auth is None else {"Authorization": auth}
    client = httpx.Client(base_url=api.url, timeout=30)
    api.clients.append(client)
    if create:
        body = {"repo": "demo", "script_key": "echo", "args": {"message": "auth"}}
        r = client.post("/api/runner/jobs", json=body, headers=headers)
        answer = check_answer(api, r, {201, 401})
    else:
        r = client.get("/api/runner/jobs", headers=headers)
        answer = check_answer(api, r, {200, 401})
    if r.status_code == 401:
        assert r.headers.get("www-authenticate") == "Bearer"
        return
    user = (answer["requested_by"],) if create else {item["requested_by"] for item in answer["items"]}
    # Who the header says: one of the tokens, or a JWT's `sub` (an admin's lists show everyone).
    if auth is not None and api.alice.encode() in auth:
        assert set(user) <= {"alice"}
    elif auth is not None and api.bob.encode() in auth:
        assert set(user) <= {"bob"}
    else:
        token = auth.split(maxsplit=1)[1].decode() if auth else ""
        claimed = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])
        if create or claimed.get("role", "user") != "admin":
            assert set(user) <= {claimed["sub"]}, (claimed, user)
        assert claimed["sub"] not in ("system",) and not str(claimed["sub"]).startswith("cli:")


def test_the_model_refuses_what_the_docs_refuse() -> None:
    """The model itself, on the awkward numbers: an infinite count, a bool for an int."""
    assert not model_accepts(
        {"repo": "demo", "script_key": "echo", "args": {"message": "x", "count": math.inf}}
    )
    assert model_accepts({"repo": "demo", "script_key": "echo", "args": {"message": "x", "count": 10}})
    assert not model_accepts({"repo": "demo", "script_key": "echo", "args": {"message": "x", "count": True}})
