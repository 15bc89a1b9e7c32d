"""The retention sweep of idempotency keys beside live creates (SPEC §4, §9: safe beside traffic)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from codex_runner.ops.retention import _delete_keys
from codex_runner.store.records import utcnow
from codex_runner.store.schema import idempotency_keys, jobs

P1 = {"repo": "demo", "script_key": "echo", "args": {"message": "one"}}
P2 = {"repo": "demo", "script_key": "echo", "args": {"message": "two"}}


def _post(api: Any, body: dict[str, Any], key: str) -> httpx.Response:
    with httpx.Client(base_url=api.url, timeout=60) as c:
        return c.post(
            "/api/runner/jobs",
            json=body,
            headers={"Authorization": f"Bearer {api.alice}", "Idempotency-Key": key},
        )


# SQLite runs the sweep and a create one after the other (one write lock): no window to test.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_the_key_sweep_keeps_a_key_a_create_just_renewed(api: Any) -> None:
    """On PostgreSQL a create may reuse an expired key between the sweep's select of stale keys and
    its delete: the fresh row stays, so a retry of that create is a replay, not a second job."""
    engine = api.runtime.engine
    assert _post(api, P1, "k").status_code == 201
    with engine.begin() as conn:  # the key's window has ended; its job stays
        conn.execute(idempotency_keys.update().values(expires_at=utcnow() - timedelta(seconds=1)))
    answers: list[httpx.Response] = []

    def after(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        # Between the sweep's select of stale keys and its delete, the client reuses the key.
        if (
            not answers
            and statement.lstrip().upper().startswith("SELECT")
            and "runner_idempotency_keys" in statement
            and "expires_at <=" in statement
        ):
            answers.append(_post(api, P2, "k"))

    sa.event.listen(engine, "after_cursor_execute", after)
    try:
        _delete_keys(engine, utcnow(), 100, False, set())
    finally:
        sa.event.remove(engine, "after_cursor_execute", after)
    assert answers and answers[0].status_code == 201
    retry = _post(api, P2, "k")
    with engine.connect() as conn:
        made = conn.execute(
            sa.select(sa.func.count()).select_from(jobs).where(jobs.c.args["message"].as_string() == "two")
        ).scalar_one()
    assert (retry.status_code, retry.json()["id"], made) == (200, answers[0].json()["id"], 1)
