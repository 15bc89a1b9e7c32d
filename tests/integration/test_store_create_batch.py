"""Group commit of creates (`JobStore.create_many`) on SQLite and PostgreSQL: every item of a batch
gets the answer it would have got alone, after the items before it; nothing is lost and nothing
extra is written."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa

from codex_runner.errors import IdempotencyConflict, QueueFull, UserQueueFull
from codex_runner.store import JobStore
from codex_runner.store.jobs import Limits, NewJob
from codex_runner.store.schema import all_job_counts, events, idempotency_keys, jobs

from tests.helpers import recorded_statements


def job(user: str, key: str | None = None, payload: int = 1) -> NewJob:
    return NewJob(
        repo_id="id-r1",
        repo_name="r1",
        workspace_mode="worktree",
        script_key="s",
        args={"a": payload},
        defaults={},
        timeout_seconds=60,
        requested_by=user,
        idempotency_key=key,
    )


def table(store: JobStore) -> dict[str, Any]:
    with store.engine.connect() as conn:
        n_jobs = conn.execute(sa.select(sa.func.count()).select_from(jobs)).scalar_one()
        kinds = Counter(conn.execute(sa.select(events.c.event_type)).scalars())
        keys = conn.execute(sa.select(idempotency_keys.c.user, idempotency_keys.c.key)).all()
        counted = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(all_job_counts.c.n), 0))).scalar_one()
    return {"jobs": n_jobs, "events": dict(kinds), "keys": sorted(map(tuple, keys)), "counted": counted}


def test_mixed_batch_answers_each_item_as_if_alone(store: JobStore) -> None:
    limits = Limits(max_queue_size=6, max_queued_per_user=3)
    earlier, _ = store.create(job("alice", "k1"), limits)  # alice: 1 queued, 1 active in all
    batch = [
        job("alice"),  # created: alice 2, active 2
        job("alice", "k1"),  # replay of the earlier job
        job("alice", "k1", payload=2),  # same key, other payload: 409
        job("bob", "k2"),  # created: active 3
        job("bob", "k2"),  # replay of the job created just before, in this batch
        job("bob", "k2", payload=2),  # 409 against a key written in this batch
        job("alice"),  # created: alice 3, active 4
        job("alice"),  # alice's cap
        job("alice", "k3"),  # alice's cap too: its key must not be written
        job("carol"),  # created: active 5
        job("dave"),  # created: active 6
        job("erin"),  # the global cap
    ]
    out = store.create_many(batch, limits)

    assert [type(o).__name__ if isinstance(o, Exception) else ("replay" if o[1] else "new") for o in out] == [
        "new",
        "replay",
        "IdempotencyConflict",
        "new",
        "replay",
        "IdempotencyConflict",
        "new",
        "UserQueueFull",
        "UserQueueFull",
        "new",
        "new",
        "QueueFull",
    ]
    assert isinstance(out[2], IdempotencyConflict)
    assert out[2].code == "idempotency_key_reused_with_different_payload"
    assert isinstance(out[7], UserQueueFull) and isinstance(out[11], QueueFull)
    assert not isinstance(out[11], UserQueueFull)
    assert not isinstance(out[1], Exception) and out[1][0]["id"] == earlier["id"]
    assert not isinstance(out[3], Exception) and not isinstance(out[4], Exception)
    assert out[4][0]["id"] == out[3][0]["id"]
    new_ids = {o[0]["id"] for o in out if not isinstance(o, Exception) and not o[1]}
    assert len(new_ids) == 5

    facts = table(store)
    assert facts["jobs"] == 6 == facts["counted"]
    assert facts["events"] == {"job_created": 6, "job_deduplicated": 2}
    assert facts["keys"] == [("alice", "k1"), ("bob", "k2")]
    replayed = out[3][0]["id"]
    for job_id in new_ids:
        got = store.get(job_id, with_events=True)
        assert got["status"] == "queued"
        # The replay's event comes after the creation's, even within one batch.
        expected = ["job_created", "job_deduplicated"] if job_id == replayed else ["job_created"]
        assert [e["event_type"] for e in got["events"]] == expected


def test_batch_replaces_an_expired_key_once(store: JobStore) -> None:
    first, _ = store.create(job("alice", "old"), Limits(idempotency_window_seconds=0))
    out = store.create_many([job("alice", "old", payload=2), job("alice", "old", payload=2)], Limits())
    assert not isinstance(out[0], Exception) and not isinstance(out[1], Exception)
    assert out[0][1] is False and out[0][0]["id"] != first["id"]
    assert out[1][1] is True and out[1][0]["id"] == out[0][0]["id"]
    facts = table(store)
    assert facts["jobs"] == 2 and facts["keys"] == [("alice", "old")]
    with store.engine.connect() as conn:
        owner = conn.execute(sa.select(idempotency_keys.c.job_id)).scalar_one()
    assert owner == out[0][0]["id"]


def test_a_database_error_fails_only_its_own_item(store: JobStore) -> None:
    bad = dataclasses.replace(job("bob"), repo_name=None)  # type: ignore[arg-type]  # NOT NULL
    out = store.create_many([job("alice", "k"), bad, job("carol")], Limits())
    assert isinstance(out[1], sa.exc.IntegrityError)
    assert not isinstance(out[0], Exception) and not isinstance(out[2], Exception)
    facts = table(store)
    assert facts["jobs"] == 2 == facts["counted"]
    assert facts["events"] == {"job_created": 2}
    assert facts["keys"] == [("alice", "k")]
    with pytest.raises(sa.exc.IntegrityError):
        store.create(bad, Limits())


def test_empty_batch_writes_nothing(store: JobStore) -> None:
    assert store.create_many([], Limits()) == []
    assert table(store)["jobs"] == 0


def test_a_batch_reads_what_its_caps_need_in_one_statement(store: JobStore) -> None:
    """The active total and the queued count of each of the batch's users: one read (one round
    trip on PostgreSQL), and the caps still hold against jobs made before and in the batch."""
    limits = Limits(max_queue_size=5, max_queued_per_user=2)
    store.create(job("alice"), limits)
    store.create(job("bob"), limits)
    with recorded_statements(store) as seen:
        out = store.create_many([job("alice"), job("alice"), job("carol"), job("bob"), job("dave")], limits)
    reads = [sql for sql in seen if "runner_job_counts" in sql]
    assert len(reads) == 1, seen
    assert [type(o).__name__ if isinstance(o, Exception) else "created" for o in out] == [
        "created",  # alice: 2 queued, 3 active
        "UserQueueFull",  # alice's cap
        "created",  # 4 active
        "created",  # bob: 2 queued, 5 active
        "QueueFull",  # the global cap
    ]
