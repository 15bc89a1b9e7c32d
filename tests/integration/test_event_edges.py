"""Every edge of the transition table, and every other lifecycle step (create, replay, claim,
cancel, recovery, cleanup), leaves its event row and, with RUNNER_AUDIT_LOG, the same event as an
audit line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from codex_runner.config import load_settings
from codex_runner.jobs import EVENT_FOR_STATUS, TRANSITIONS, Status
from codex_runner.ops.audit import attach, audit_admin
from codex_runner.ops.retention import cleanup
from codex_runner.runtime import Runtime
from codex_runner.store.admin import Principal
from codex_runner.store.records import iso
from codex_runner.store.schema import events, jobs

from tests.helpers import write_scratch_echo_config

EDGES = [(src, dst) for src in Status for dst in sorted(TRANSITIONS[src])]
ALICE = Principal("alice", "user")


@pytest.fixture
def runtime(tmp_path: Path, database_url: str) -> Iterator[Runtime]:
    write_scratch_echo_config(tmp_path)
    env = {
        "RUNNER_DATABASE_URL": database_url,
        "RUNNER_DATA_DIR": str(tmp_path / "data"),
        "RUNNER_ID": "test-edges",
        "RUNNER_ENABLED": "false",
        "RUNNER_AUDIT_LOG": str(tmp_path / "audit" / "audit.jsonl"),
        "RUNNER_RETENTION_DAYS": "0",
        "RUNNER_RETENTION_KEEP": "0",
    }
    rt = Runtime.open(load_settings(env, cwd=tmp_path))
    assert attach(rt) is not None
    assert attach(rt) is attach(rt)  # idempotent: one listener, one line per event
    yield rt
    rt.close()


def create(rt: Runtime, key: str | None = None, message: str = "hi") -> str:
    job, _ = rt.create_job(ALICE, {"repo": "demo", "script_key": "echo", "args": {"message": message}}, key)
    return str(job["id"])


def force(rt: Runtime, job_id: str, status: Status) -> None:
    with rt.engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(status=status.value, lease_token="L"))


def db_events(rt: Runtime, job_id: str | None = None) -> list[dict[str, Any]]:
    query = sa.select(events).order_by(events.c.id)
    if job_id is not None:
        query = query.where(events.c.job_id == job_id)
    with rt.engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def audit(rt: Runtime) -> list[dict[str, Any]]:
    assert rt.settings.audit_log is not None
    return [json.loads(line) for line in rt.settings.audit_log.read_text().splitlines()]


def as_audit(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "ts": iso(row["created_at"]),
        "event_type": row["event_type"],
        "job_id": row["job_id"],
        "actor": row["actor"],
        "message": row["message"],
        "meta": row["meta"],
    }


@pytest.mark.parametrize(("src", "dst"), EDGES, ids=[f"{s.value}->{d.value}" for s, d in EDGES])
def test_every_edge_is_an_event_and_an_audit_line(runtime: Runtime, src: Status, dst: Status) -> None:
    job_id = create(runtime)
    force(runtime, job_id, src)
    assert runtime.jobs.transition(job_id, src, dst, lease_token="L", actor="edge-test", message="m")
    last = db_events(runtime, job_id)[-1]
    assert last["event_type"] == EVENT_FOR_STATUS[dst].value and last["actor"] == "edge-test"
    lines = [line for line in audit(runtime) if line["job_id"] == job_id]
    assert lines == [as_audit(r) for r in db_events(runtime, job_id)]
    assert [line["event_type"] for line in lines] == ["job_created", EVENT_FOR_STATUS[dst].value]


def test_every_lifecycle_step_is_audited(runtime: Runtime) -> None:
    store = runtime.jobs
    first = create(runtime, key="k1")
    replay, dedup = runtime.create_job(
        ALICE, {"repo": "demo", "script_key": "echo", "args": {"message": "hi"}}, "k1"
    )
    assert dedup and replay["id"] == first
    queued = create(runtime, message="cancel me")
    runtime.cancel_job(ALICE, queued)
    claimed = {c.id: c for c in store.claim("test-edges", slots=10, max_jobs_per_user=10)}
    assert set(claimed) == {first}
    to_cancel, stale, crashed = create(runtime), create(runtime), create(runtime)
    claimed.update({c.id: c for c in store.claim("test-edges", slots=10, max_jobs_per_user=10)})
    runtime.cancel_job(ALICE, to_cancel)
    store.transition(
        to_cancel, Status.CANCEL_REQUESTED, Status.CANCELED, lease_token=claimed[to_cancel].lease_token
    )
    store.transition(stale, Status.RUNNING, Status.FAILED, event_type="heartbeat_stale_recovered")
    store.transition(crashed, Status.RUNNING, Status.FAILED, event_type="recovered_after_crash")
    store.transition(first, Status.RUNNING, Status.SUCCESS, lease_token=claimed[first].lease_token)

    rows = db_events(runtime)
    kinds = {r["event_type"] for r in rows}
    assert kinds >= {
        "job_created",
        "job_deduplicated",
        "job_started",
        "job_canceled",
        "job_cancel_requested",
        "heartbeat_stale_recovered",
        "recovered_after_crash",
        "job_succeeded",
    }
    assert audit(runtime) == [as_audit(r) for r in rows]

    # Cleanup and admin actions have no event row (the job is gone, or there is none): audit only.
    # RUNNER_RETENTION_DAYS=0 and _KEEP=0: every terminal job is due.
    report = cleanup(runtime)
    assert report.jobs == 5  # every terminal job; the replayed and queued ones are terminal too
    audit_admin(runtime, "token_created", "root", {"token_id": "t1", "user": "bob", "role": "user"})
    tail = audit(runtime)[len(rows) :]
    assert [t["event_type"] for t in tail] == ["job_cleaned_up", "token_created"]
    assert tail[0]["meta"]["jobs"] == 5 and tail[0]["job_id"] is None
    assert tail[1]["actor"] == "root" and tail[1]["meta"]["user"] == "bob"
