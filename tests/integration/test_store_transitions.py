"""The job store on SQLite and PostgreSQL: the transition table, CAS writes, leases and claims."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from codex_runner.errors import InvalidTransition
from codex_runner.jobs import EVENT_FOR_STATUS, TRANSITIONS, Status, canonical_payload, payload_hash
from codex_runner.store import JobStore
from codex_runner.store.jobs import Limits, NewJob
from codex_runner.store.migrate import MIGRATIONS_DIR, current_revision, head_revision, upgrade
from codex_runner.store.schema import all_job_counts, events, jobs, metadata


def new_job(user: str = "alice", repo: str = "r1", mode: str = "worktree", key: str | None = None) -> NewJob:
    return NewJob(
        repo_id=f"id-{repo}",
        repo_name=repo,
        workspace_mode=mode,
        script_key="s",
        args={"a": 1},
        defaults={},
        timeout_seconds=60,
        requested_by=user,
        idempotency_key=key,
    )


BIG = Limits(max_queue_size=10_000, max_queued_per_user=10_000)


def _force_status(store: JobStore, job_id: str, status: Status, lease: str | None = "L") -> None:
    with store.engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(status=status.value, lease_token=lease))


def _snapshot(store: JobStore, job_id: str) -> tuple[dict[str, Any], int]:
    with store.engine.connect() as conn:
        row = dict(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().one())
        n = conn.execute(
            sa.select(sa.func.count()).select_from(events).where(events.c.job_id == job_id)
        ).scalar_one()
    return row, int(n)


def test_migrations_reach_head(store: JobStore) -> None:
    assert current_revision(store.engine) == head_revision()
    upgrade(store.engine)  # idempotent
    assert current_revision(store.engine) == head_revision()


def test_migrations_match_the_schema(store: JobStore) -> None:
    """The migrated database has exactly the tables, columns and indexes `schema.py` declares."""
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_status_user_index_migration_keeps_the_counts(store: JobStore) -> None:
    """0003 drops a redundant index without copying `runner_jobs` (which would lose the job-count
    triggers); its downgrade puts the index back."""

    def indexes() -> set[str]:
        return {ix["name"] for ix in sa.inspect(store.engine).get_indexes("runner_jobs")}

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with store.engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0002")
        conn.commit()
    assert "ix_runner_jobs_status_user" in indexes()
    upgrade(store.engine)
    assert "ix_runner_jobs_status_user" not in indexes()
    job, _ = store.create(new_job(user="counted"), BIG)
    store.transition(job["id"], Status.QUEUED, Status.CANCELED, message="m")
    with store.engine.connect() as conn:
        counted = all_job_counts.c
        counts = dict(
            conn.execute(
                sa.select(counted.status, sa.func.sum(counted.n))
                .where(counted.requested_by == "counted")
                .group_by(counted.status)
            ).all()
        )
    assert counts == {"queued": 0, "canceled": 1}


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(Status, Status)))
def test_transition_table(store: JobStore, src: Status, dst: Status) -> None:
    job, _ = store.create(new_job(), BIG)
    _force_status(store, job["id"], src)
    before, n_before = _snapshot(store, job["id"])
    if dst in TRANSITIONS[src]:
        assert store.transition(job["id"], src, dst, lease_token="L", message="m")
        after, n_after = _snapshot(store, job["id"])
        assert after["status"] == dst.value
        assert n_after == n_before + 1
        evs = store.events(job["id"])
        assert evs[-1]["event_type"] == EVENT_FOR_STATUS[dst].value
        if dst.terminal:
            assert after["finished_at"] is not None
    else:
        with pytest.raises(InvalidTransition):
            store.transition(job["id"], src, dst, lease_token="L")
        after, n_after = _snapshot(store, job["id"])
        assert after == before and n_after == n_before


@pytest.mark.parametrize(("src", "dst"), [(s, d) for s in Status for d in sorted(TRANSITIONS[s])])
def test_cas_refuses_stale_status_and_lease(store: JobStore, src: Status, dst: Status) -> None:
    job, _ = store.create(new_job(), BIG)
    other = next(s for s in Status if s is not src)
    _force_status(store, job["id"], other)
    before = _snapshot(store, job["id"])
    assert store.transition(job["id"], src, dst, lease_token="L") is False
    assert _snapshot(store, job["id"]) == before
    _force_status(store, job["id"], src, lease="other-lease")
    before = _snapshot(store, job["id"])
    assert store.transition(job["id"], src, dst, lease_token="L") is False
    assert _snapshot(store, job["id"]) == before


def test_claim_fifo_and_limits(store: JobStore) -> None:
    ids = []
    for user in ["a", "a", "a", "a", "b", "c"]:
        ids.append(store.create(new_job(user), BIG)[0]["id"])
    claimed = store.claim("r1", slots=10, max_jobs_per_user=2)
    got = [c.id for c in claimed]
    assert got == [ids[0], ids[1], ids[4], ids[5]]
    assert len({c.lease_token for c in claimed}) == 4
    row = store.get_row(ids[0])
    assert row is not None and row["status"] == "running" and row["runner_id"] == "r1" and row["attempt"] == 1
    # a's limit is reached: nothing more for a until one of its jobs ends.
    assert store.claim("r2", slots=10, max_jobs_per_user=2) == []
    assert store.transition(ids[0], Status.RUNNING, Status.SUCCESS, lease_token=claimed[0].lease_token)
    again = store.claim("r2", slots=10, max_jobs_per_user=2)
    assert [c.id for c in again] == [ids[2]]


def test_claim_reads_past_pages_of_jobs_it_must_skip(store: JobStore) -> None:
    """A user who reaches the limit within the claim is not filtered in SQL: their later jobs
    fill pages that the claim reads past (keyset pages), to the next user's job, in FIFO order."""
    ahead = [store.create(new_job("a"), BIG)[0]["id"] for _ in range(10)]
    behind = store.create(new_job("b"), BIG)[0]["id"]
    claimed = store.claim("r", slots=2, max_jobs_per_user=1)
    assert [c.id for c in claimed] == [ahead[0], behind]
    # An explicit small scan takes the same path, one row per page.
    store.transition(ahead[0], Status.RUNNING, Status.SUCCESS, lease_token=claimed[0].lease_token)
    store.transition(behind, Status.RUNNING, Status.SUCCESS, lease_token=claimed[1].lease_token)
    assert [c.id for c in store.claim("r", slots=1, max_jobs_per_user=1, scan=1)] == [ahead[1]]


def test_claim_in_place_one_at_a_time(store: JobStore) -> None:
    a = store.create(new_job("u1", repo="solo", mode="in_place"), BIG)[0]["id"]
    b = store.create(new_job("u2", repo="solo", mode="in_place"), BIG)[0]["id"]
    c = store.create(new_job("u3", repo="other"), BIG)[0]["id"]
    first = store.claim("r", slots=5, max_jobs_per_user=5)
    assert [x.id for x in first] == [a, c]
    assert store.claim("r", slots=5, max_jobs_per_user=5) == []
    store.transition(a, Status.RUNNING, Status.FAILED, lease_token=first[0].lease_token)
    assert [x.id for x in store.claim("r", slots=5, max_jobs_per_user=5)] == [b]


def test_heartbeat_reports_lost_leases_and_cancels(store: JobStore) -> None:
    ids = [store.create(new_job(f"u{i}"), BIG)[0]["id"] for i in range(3)]
    claimed = {c.id: c.lease_token for c in store.claim("r", slots=3, max_jobs_per_user=3)}
    store.cancel(ids[1], owner=None, actor="admin")
    # The watchdog recovers ids[2]: its lease is dropped.
    assert store.transition(ids[2], Status.RUNNING, Status.FAILED, values={"lease_token": None})
    alive = store.heartbeat("r", claimed)
    assert alive == {ids[0]: "running", ids[1]: "cancel_requested"}
    assert store.update_fields(ids[2], claimed[ids[2]], {"stages": []}) is False
    assert store.update_fields(ids[0], claimed[ids[0]], {"pid": 42}) is True


def test_watchdog_cas_respects_fresh_heartbeat(store: JobStore) -> None:
    job = store.create(new_job(), BIG)[0]["id"]
    lease = store.claim("r", slots=1, max_jobs_per_user=1)[0].lease_token
    # The heartbeat is fresh (set at claim): the watchdog's write must not land.
    assert not store.transition(job, [Status.RUNNING], Status.FAILED, stale_after_seconds=60)
    assert store.stale_jobs(60) == []
    assert store.stale_jobs(-1)[0]["lease_token"] == lease


def test_canonical_hash_stability() -> None:
    a = payload_hash("r", "s", {"b": 2, "a": "x", "n": None})
    b = payload_hash("r", "s", {"n": None, "a": "x", "b": 2})
    assert a == b
    assert payload_hash("r", "s", {"a": 1, "d": 5}, {"d": 5}) == payload_hash("r", "s", {"a": 1})
    assert payload_hash("r", "s", {"a": 1, "d": 6}, {"d": 5}) != payload_hash("r", "s", {"a": 1})
    text = canonical_payload("r", "s", {"msg": "h\u00e9llo \u2603", "k": [1, 2]})
    assert text == '{"args":{"k":[1,2],"msg":"h\u00e9llo \u2603"},"repo_id":"r","script_key":"s"}'.encode()
    # NFC and NFD spellings are different texts, so different payloads.
    assert payload_hash("r", "s", {"m": "\u00e9"}) != payload_hash("r", "s", {"m": "e\u0301"})
    assert payload_hash("r", "s", {"x": 1}) != payload_hash("r", "s", {"x": True})
