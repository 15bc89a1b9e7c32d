"""Group commit of terminal writes (`JobStore.finish_many`, `GroupCommitter`) on SQLite and
PostgreSQL: one write that does not hold, or that the database refuses, never costs the others."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import sqlalchemy as sa

from codex_runner.execution import finisher
from codex_runner.execution.finisher import Ending, GroupCommitter, Outcome
from codex_runner.jobs import Status
from codex_runner.store import JobStore
from codex_runner.store.jobs import Cas, ClaimRequest, Limits, NewJob, OwnerWrite
from codex_runner.store.records import iso
from codex_runner.store.schema import events, jobs

from tests.helpers import recorded_statements

BIG = Limits(max_queue_size=10_000, max_queued_per_user=10_000)


def _new(user: str) -> NewJob:
    return NewJob(
        repo_id="id-r",
        repo_name="r",
        workspace_mode="scratch",
        script_key="s",
        args={},
        defaults={},
        timeout_seconds=60,
        requested_by=user,
    )


def _success(job_id: str, lease: str, exit_code: int = 0) -> OwnerWrite:
    values = {"exit_code": exit_code, "pid": 4242}
    canceled = Cas((Status.CANCEL_REQUESTED,), Status.CANCELED, values, "canceled")
    return OwnerWrite(job_id, lease, (Cas((Status.RUNNING,), Status.SUCCESS, values, "success"), canceled))


def _terminal_events(store: JobStore, job_id: str) -> list[str]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(events.c.event_type).where(events.c.job_id == job_id).order_by(events.c.id)
        ).scalars()
        return [t for t in rows if t not in ("job_created", "job_started", "job_cancel_requested")]


def _claim_all(store: JobStore, n: int) -> dict[str, str]:
    for i in range(n):
        store.create(_new(f"u{i}"), BIG)
    return {c.id: c.lease_token for c in store.claim("r", slots=n, max_jobs_per_user=n)}


def test_one_lost_cas_does_not_affect_the_batch(store: JobStore) -> None:
    leases = _claim_all(store, 4)
    ok, lost, canceled, other = list(leases)
    # Another instance's watchdog took `lost` (lease dropped); a cancel arrived for `canceled`.
    assert store.transition(lost, Status.RUNNING, Status.FAILED, values={"lease_token": None})
    store.cancel(canceled, owner=None, actor="admin")
    held, claimed = store.finish_many([_success(j, leases[j]) for j in (ok, lost, canceled, other)])
    assert held == [0, None, 1, 0] and claimed == []
    statuses = store.status_of(list(leases))
    assert statuses == {ok: "success", lost: "failed", canceled: "canceled", other: "success"}
    for job_id in (ok, other):
        assert _terminal_events(store, job_id) == ["job_succeeded"]
        assert store.get_row(job_id)["pid"] == 4242  # type: ignore[index]
    assert _terminal_events(store, canceled) == ["job_canceled"]
    # The lost job keeps what the watchdog wrote, and only its event.
    assert store.get_row(lost)["pid"] is None  # type: ignore[index]
    assert len(_terminal_events(store, lost)) == 1


def test_finish_and_claim_in_one_transaction(store: JobStore) -> None:
    first = store.create(_new("alice"), BIG)[0]["id"]
    second = store.create(_new("alice"), BIG)[0]["id"]
    [claimed] = store.claim("r", slots=2, max_jobs_per_user=1)
    assert claimed.id == first  # alice is at her limit: `second` waits
    heard: list[dict[str, Any]] = []
    store.listeners.append(heard.append)
    with recorded_statements(store) as seen:
        held, more = store.finish_many(
            [_success(first, claimed.lease_token)], ClaimRequest("r", slots=1, max_jobs_per_user=1)
        )
    # The claim sees `first` finished in the same transaction, so alice has a slot again.
    assert held == [0] and [c.id for c in more] == [second]
    assert more[0].row["status"] == "running" and more[0].row["lease_token"] == more[0].lease_token
    assert store.status_of([first, second]) == {first: "success", second: "running"}
    # Both events in one insert, each with its own time: the claim's is its `started_at`.
    assert sum(sql.lstrip().upper().startswith("INSERT INTO RUNNER_JOB_EVENTS") for sql in seen) == 1
    assert [(e["job_id"], e["event_type"]) for e in heard] == [
        (first, "job_succeeded"),
        (second, "job_started"),
    ]
    started = store.get(second, with_events=True)
    [event] = [e for e in started["events"] if e["event_type"] == "job_started"]
    assert event["created_at"] == started["started_at"]


def test_group_committer_isolates_a_refused_write(store: JobStore) -> None:
    leases = _claim_all(store, 3)
    good1, bad, good2 = list(leases)
    seen: dict[str, Outcome] = {}
    broken = OwnerWrite(bad, leases[bad], (Cas((Status.RUNNING,), Status.SUCCESS, {"no_such_column": 1}),))

    def ending(write: OwnerWrite) -> Ending:
        return Ending(write, lambda: None, lambda outcome: seen.__setitem__(write.job_id, outcome))

    async def scenario() -> list[Any]:
        committer = GroupCommitter(store)
        writes = [_success(good1, leases[good1]), broken, _success(good2, leases[good2])]
        return await asyncio.gather(*(committer.commit(ending(w)) for w in writes), return_exceptions=True)

    results = asyncio.run(scenario())
    assert results[0] == 0 and results[2] == 0
    assert isinstance(results[1], Exception)
    assert seen[good1] == 0 and seen[good2] == 0 and isinstance(seen[bad], Exception)
    assert store.status_of(list(leases)) == {good1: "success", bad: "running", good2: "success"}


def _counting_batches(store: JobStore) -> list[int]:
    """The size of every `finish_many` batch from now on."""
    calls: list[int] = []
    inner = store.finish_many

    def counting(writes: Any, claim: Any = None) -> Any:
        calls.append(len(writes))
        return inner(writes, claim)

    store.finish_many = counting  # type: ignore[method-assign]
    return calls


def test_group_committer_batches_endings(store: JobStore) -> None:
    leases = _claim_all(store, 5)
    calls = _counting_batches(store)

    async def scenario() -> list[int | None]:
        committer = GroupCommitter(store)
        ends = [Ending(_success(j, lease), lambda: None, lambda _: None) for j, lease in leases.items()]
        return await asyncio.gather(*(committer.commit(e) for e in ends))

    assert asyncio.run(scenario()) == [0] * 5
    assert calls == [5]  # one transaction for all that ended together
    with store.engine.connect() as conn:
        done = conn.execute(sa.select(sa.func.count()).where(jobs.c.status == "success")).scalar_one()
    assert done == 5


def test_group_committer_syncs_the_batch_in_two_rounds(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the endings ask to have fsynced is synced in one round while the transaction runs (the
    manifests, done before any is published) and one after it (their folders), before any job
    hears its outcome but while the jobs claimed along start; a failed fsync is a warning, not a
    failed job."""
    leases = _claim_all(store, 3)
    order: list[Any] = []
    inner = store.finish_many

    def writing(writes: Any, claim: Any = None) -> Any:
        order.append(("write", len(writes)))
        return inner(writes, claim)

    def failures(paths: list[str]) -> list[tuple[str, OSError]]:
        return [(p, FileNotFoundError(2, "No such file or directory")) for p in paths if "b" in p]

    class Recorded:
        def __init__(self, paths: list[str]) -> None:
            self.paths = sorted(paths)
            order.append(("start syncs", self.paths))

        def wait(self) -> list[tuple[str, OSError]]:
            order.append(("synced", self.paths))
            return failures(self.paths)

        async def wait_async(self) -> list[tuple[str, OSError]]:
            return self.wait()

    store.finish_many = writing  # type: ignore[method-assign]
    monkeypatch.setattr(finisher, "Fsyncs", Recorded)

    def ending(job_id: str, name: str) -> Ending:
        def after(outcome: Outcome) -> str:
            order.append(("after", name))
            return f"/runs/{name}"

        def written(outcome: Outcome) -> None:
            order.append(("written", name))

        return Ending(_success(job_id, leases[job_id]), lambda: f"/runs/{name}/tmp", after, written)

    class Hook:
        def holding(self) -> int:
            return 0  # no linger: this test is about the order within one batch

        async def begin(self, ending: list[str]) -> ClaimRequest | None:
            return None

        def end(self, ending: list[str], claimed: list[Any], error: BaseException | None) -> None:
            order.append(("claimed jobs start", len(ending)))

    async def scenario() -> list[int | None]:
        committer = GroupCommitter(store, Hook())

        async def commit(job_id: str, name: str) -> int | None:
            outcome = await committer.commit(ending(job_id, name))
            order.append(("heard", name))
            return outcome

        return await asyncio.gather(*(commit(j, n) for j, n in zip(leases, "abc", strict=True)))

    assert asyncio.run(scenario()) == [0, 0, 0]
    files, folders = ["/runs/a/tmp", "/runs/b/tmp", "/runs/c/tmp"], ["/runs/a", "/runs/b", "/runs/c"]
    assert order[:12] == [
        ("start syncs", files),
        ("write", 3),
        # The service log lines follow the status at once, ahead of any wait for an fsync.
        ("written", "a"),
        ("written", "b"),
        ("written", "c"),
        ("synced", files),
        ("after", "a"),
        ("after", "b"),
        ("after", "c"),
        ("start syncs", folders),
        ("claimed jobs start", 3),  # while the folders sync
        ("synced", folders),
    ]
    assert sorted(order[12:]) == [("heard", "a"), ("heard", "b"), ("heard", "c")]
    assert set(store.status_of(list(leases)).values()) == {"success"}


class _Slots:
    """A launcher's claim hook as the linger sees it: `holding` jobs hold a slot; claims nothing."""

    def __init__(self, holding: int) -> None:
        self.slots = holding

    def holding(self) -> int:
        return self.slots

    async def begin(self, ending: list[str]) -> ClaimRequest | None:
        return None

    def end(self, ending: list[str], claimed: list[Any], error: BaseException | None) -> None:
        self.slots -= len(ending)


def test_a_batch_waits_for_the_endings_of_jobs_still_running(store: JobStore) -> None:
    """Three jobs hold slots; their endings arrive 20 ms apart: one batch takes all three, as
    long as the linger covers the gaps (the first one waits for the other two)."""
    leases = _claim_all(store, 3)
    batches = _counting_batches(store)

    async def scenario() -> list[int | None]:
        committer = GroupCommitter(store, _Slots(3), linger=5.0)

        async def end_after(delay: float, job_id: str) -> int | None:
            await asyncio.sleep(delay)
            return await committer.commit(
                Ending(_success(job_id, leases[job_id]), lambda: None, lambda _: None)
            )

        return await asyncio.gather(*(end_after(0.02 * i, j) for i, j in enumerate(leases)))

    assert asyncio.run(scenario()) == [0, 0, 0]
    assert batches == [3]


def test_a_batch_lingers_no_longer_than_its_bound(store: JobStore) -> None:
    """A job ends while another still runs and does not end: its batch waits the linger, then
    commits alone; a job ending when no other job holds a slot commits at once."""
    leases = _claim_all(store, 2)
    first, second = list(leases)
    batches = _counting_batches(store)

    async def scenario(job_id: str, holding: int, linger: float) -> float:
        committer = GroupCommitter(store, _Slots(holding), linger=linger)
        t0 = time.monotonic()
        assert (
            await committer.commit(Ending(_success(job_id, leases[job_id]), lambda: None, lambda _: None))
            == 0
        )
        return time.monotonic() - t0

    waited = asyncio.run(scenario(first, holding=2, linger=0.3))
    assert 0.3 <= waited < 5, waited
    alone = asyncio.run(scenario(second, holding=1, linger=30.0))
    assert alone < 5, alone  # a 30 s linger would show
    assert batches == [1, 1]


def test_endings_queued_while_the_claim_turn_fails_hear_it(store: JobStore) -> None:
    """The group commit is cancelled (shutdown) while it waits for the launcher's claim turn:
    the batch it held and the endings that arrived during that wait all hear of it at once,
    rather than wait for a next job's end that may never come."""
    leases = _claim_all(store, 2)
    first, second = list(leases)

    class StuckTurn(_Slots):
        def __init__(self) -> None:
            super().__init__(0)
            self.waiting = asyncio.Event()

        async def begin(self, ending: list[str]) -> ClaimRequest | None:
            self.waiting.set()
            await asyncio.sleep(3600)
            return None

    async def scenario() -> list[bool]:
        hook = StuckTurn()
        committer = GroupCommitter(store, hook)

        def commit(job_id: str) -> asyncio.Task[int | None]:
            end = Ending(_success(job_id, leases[job_id]), lambda: None, lambda _: None)
            return asyncio.create_task(committer.commit(end))

        held = commit(first)
        await asyncio.wait_for(hook.waiting.wait(), 5)
        queued = commit(second)
        await asyncio.sleep(0.01)  # the second ending is queued behind the stuck batch
        assert committer._task is not None
        committer._task.cancel()
        _, pending = await asyncio.wait({held, queued}, timeout=5)
        for task in pending:
            task.cancel()
        assert not pending, "an ending queued during the failed claim turn was left waiting"
        # Each job's commit() raised the CancelledError it heard: its task reads as cancelled.
        return [task.cancelled() for task in (held, queued)]

    assert asyncio.run(scenario()) == [True, True]
    assert set(store.status_of(list(leases)).values()) == {"running"}  # nothing was written


def _job_run_values(exit_code: int, **process: int) -> dict[str, Any]:
    """The values `JobRun._terminal_write` sets: every terminal column, process ids when the job
    ended before they were recorded. These take the store's prebuilt statement."""
    stages = [{"name": "script", "status": "success", "exit_code": exit_code}]
    values = {"exit_code": exit_code, "error_code": None, "error_message": None, "stages": stages}
    return {**values, "result": {"branch": None, "pushed": False}, **process}


def _job_run_write(job_id: str, lease: str, values: dict[str, Any]) -> OwnerWrite:
    canceled = Cas(
        (Status.CANCEL_REQUESTED,),
        Status.CANCELED,
        {**values, "error_code": "canceled", "error_message": "canceled"},
        "canceled",
    )
    return OwnerWrite(job_id, lease, (Cas((Status.RUNNING,), Status.SUCCESS, values, "success"), canceled))


def test_prebuilt_terminal_write_matches_the_general_one(store: JobStore) -> None:
    """The usual terminal write goes through one statement built once (`_TERMINAL_CAS`); it must
    write what the general compare-and-set writes, event and lease check included."""
    leases = _claim_all(store, 4)
    fresh, recorded, canceled, lost = list(leases)
    # `recorded` ran past its first second: its process ids are in the row already.
    assert store.update_fields(recorded, leases[recorded], {"pid": 7, "pgid": 7, "proc_start_time": 70})
    store.cancel(canceled, owner=None, actor="admin")
    assert store.transition(lost, Status.RUNNING, Status.FAILED, values={"lease_token": None})
    writes = [
        _job_run_write(fresh, leases[fresh], _job_run_values(0, pid=11, pgid=11, proc_start_time=110)),
        _job_run_write(recorded, leases[recorded], _job_run_values(0)),
        _job_run_write(canceled, leases[canceled], _job_run_values(0, pid=33, pgid=33, proc_start_time=330)),
        _job_run_write(lost, leases[lost], _job_run_values(0, pid=44, pgid=44, proc_start_time=440)),
    ]
    with recorded_statements(store) as seen:
        held, _ = store.finish_many(writes)
    assert held == [0, 0, 1, None]
    # One per attempt tried (1, 1, 2, 2); on PostgreSQL the four first attempts in one round trip.
    assert sum("coalesce(" in sql.lower() for sql in seen) == (3 if store.is_pg else 6)
    rows = {job_id: store.get_row(job_id) or {} for job_id in leases}
    assert rows[fresh]["status"] == "success" and rows[fresh]["finished_at"] is not None
    assert (rows[fresh]["pid"], rows[fresh]["pgid"], rows[fresh]["proc_start_time"]) == (11, 11, 110)
    assert rows[fresh]["stages"] == [{"name": "script", "status": "success", "exit_code": 0}]
    assert rows[fresh]["result"] == {"branch": None, "pushed": False}
    assert rows[fresh]["exit_code"] == 0 and rows[fresh]["error_code"] is None
    # Not in the values: the recorded ids stay (COALESCE), as the general write leaves them.
    assert (rows[recorded]["pid"], rows[recorded]["pgid"], rows[recorded]["proc_start_time"]) == (7, 7, 70)
    assert rows[canceled]["status"] == "canceled" and rows[canceled]["error_code"] == "canceled"
    assert rows[canceled]["pid"] == 33
    assert rows[lost]["status"] == "failed" and rows[lost]["pid"] is None
    assert _terminal_events(store, fresh) == ["job_succeeded"]
    assert _terminal_events(store, recorded) == ["job_succeeded"]
    assert _terminal_events(store, canceled) == ["job_canceled"]
    assert len(_terminal_events(store, lost)) == 1


def test_partial_terminal_values_leave_the_other_columns(store: JobStore) -> None:
    """A write that sets only some terminal columns takes the general statement: the prebuilt one
    would set the missing ones to NULL."""
    leases = _claim_all(store, 1)
    [job_id] = list(leases)
    stages = [{"name": "script", "status": "running"}]
    assert store.update_fields(job_id, leases[job_id], {"stages": stages, "error_message": "kept"})
    with recorded_statements(store) as seen:
        held, _ = store.finish_many([_success(job_id, leases[job_id], exit_code=3)])
    assert held == [0]
    assert not any("coalesce(" in sql.lower() for sql in seen)
    row = store.get_row(job_id) or {}
    assert row["status"] == "success" and row["exit_code"] == 3 and row["pid"] == 4242
    assert row["stages"] == stages and row["error_message"] == "kept"


def test_a_claim_moves_its_jobs_in_one_statement(store: JobStore) -> None:
    """However many jobs a claim takes, one `UPDATE` moves them all and returns their rows, each
    job with a lease of its own."""
    ids = [store.create(_new(f"u{i}"), BIG)[0]["id"] for i in range(5)]
    with recorded_statements(store) as seen:
        claimed = store.claim("r", slots=5, max_jobs_per_user=1)
    assert [c.id for c in claimed] == ids  # FIFO
    assert sum(sql.lstrip().upper().startswith(("UPDATE", "WITH")) for sql in seen) == 1
    assert len({c.lease_token for c in claimed}) == 5
    for job in claimed:
        row = store.get_row(job.id) or {}
        assert job.row == row
        assert (row["status"], row["lease_token"], row["runner_id"], row["attempt"]) == (
            "running",
            job.lease_token,
            "r",
            1,
        )
        # The first heartbeat by the shared clock: the PostgreSQL server's, this host's on SQLite.
        assert abs((row["heartbeat_at"] - row["started_at"]).total_seconds()) < 5


def test_a_claim_writes_the_started_events_with_its_update_on_postgresql(store: JobStore) -> None:
    """Each claimed job gets its `job_started` event (SPEC §3), with the claim's time and runner;
    on PostgreSQL the update writes them itself (a data-modifying CTE: one round trip less),
    SQLite has a statement for them. The listeners hear of them once committed, either way."""
    ids = [store.create(_new(f"u{i}"), BIG)[0]["id"] for i in range(3)]
    heard: list[dict[str, Any]] = []
    store.listeners.append(heard.append)
    with recorded_statements(store) as seen:
        claimed = store.claim("r", slots=3, max_jobs_per_user=1)
    inserts = [sql for sql in seen if sql.lstrip().upper().startswith("INSERT")]
    assert len(inserts) == (0 if store.is_pg else 1), seen
    assert [c.id for c in claimed] == ids
    for job in claimed:
        started = [e for e in store.events(job.id) if e["event_type"] == "job_started"]
        assert len(started) == 1, store.events(job.id)
        event = started[0]
        assert (event["actor"], event["message"], event["meta"]) == (
            "system",
            "job started",
            {"runner_id": "r"},
        )
        assert event["created_at"] == iso(job.row["started_at"])
    assert [(e["job_id"], e["event_type"]) for e in heard] == [(i, "job_started") for i in ids]


def test_a_heartbeat_and_a_batch_of_the_same_jobs_do_not_deadlock(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One instance's heartbeat (one UPDATE of all its jobs) and its batch of terminal writes (the
    jobs that just ended, in the order they ended) run at once in two threads. They lock the same
    rows; in two orders PostgreSQL breaks the cycle after deadlock_timeout (1 s), with the claim
    lock held meanwhile when the batch claims. Both lock by job id now."""
    import threading

    import codex_runner.store.engine as engine_module
    from codex_runner.store import prepared

    leases = _claim_all(store, 2)
    earlier, later = list(leases)  # claimed FIFO: in the order they were created (and stored)
    deadlocks: list[str] = []
    real_is_transient = engine_module.is_transient

    def spy(exc: BaseException) -> bool:
        if getattr(getattr(exc, "orig", None), "sqlstate", None) == "40P01":
            deadlocks.append(threading.current_thread().name)
        return real_is_transient(exc)

    monkeypatch.setattr(engine_module, "is_transient", spy)
    real_execute_each = prepared.Prepared.execute_each
    real_cas = JobStore._cas

    def slow_each(self: Any, conn: Any, rows: list[dict[str, Any]]) -> list[int]:
        out: list[int] = []
        for row in rows:  # the batch's statements one by one, with time between them
            out += real_execute_each(self, conn, [row])
            time.sleep(0.4)
        return out

    def slow_cas(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return real_cas(self, *args, **kwargs)
        finally:
            time.sleep(0.4)

    monkeypatch.setattr(prepared.Prepared, "execute_each", slow_each)
    monkeypatch.setattr(JobStore, "_cas", slow_cas)
    # The later job ended first; a plain UPDATE of both scans them in the order they are stored.
    writes = [_success(later, leases[later]), _success(earlier, leases[earlier])]
    results: dict[str, Any] = {}
    batch = threading.Thread(
        name="batch", target=lambda: results.setdefault("batch", store.finish_many(writes))
    )
    started = time.monotonic()
    batch.start()
    time.sleep(0.2)  # the batch holds its first row
    beat = threading.Thread(
        name="heartbeat", target=lambda: results.setdefault("hb", store.heartbeat("r", leases))
    )
    beat.start()
    batch.join(timeout=30)
    beat.join(timeout=30)
    assert results["batch"][0] == [0, 0]
    assert deadlocks == [] and time.monotonic() - started < 2.0, deadlocks


def test_a_lost_commit_of_a_batch_that_claimed_is_not_claimed_again(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launcher's patient store ran a batch again after its COMMIT's answer was lost, claim and
    all: if the first had been applied, the retry claimed more jobs on top, and the first claim's
    jobs ran nowhere (`running`, no process) until a watchdog failed them. Now the writes go again
    alone and the jobs the lost COMMIT claimed are started."""
    from codex_runner.errors import CommitOutcomeUnknown
    from codex_runner.launcher import _PatientJobStore

    from tests.integration.test_store_concurrency import _success

    a, b, c = (store.create(_new("u"), BIG)[0]["id"] for _ in range(3))
    (first,) = store.claim("r", slots=1, max_jobs_per_user=5)
    assert first.id == a
    calls: list[Any] = []
    real = JobStore.finish_many

    def loses_one_answer(self: JobStore, writes: Any, claim: Any = None) -> Any:
        result = real(self, writes, claim)  # applied...
        calls.append(claim)
        if len(calls) == 1:
            raise CommitOutcomeUnknown("the connection went away during COMMIT")  # ...answer lost
        return result

    monkeypatch.setattr(JobStore, "finish_many", loses_one_answer)
    patient = _PatientJobStore(store, lambda: True, lambda: {a})
    write = _success(a, first.lease_token)
    held, claimed = patient.finish_many([write], ClaimRequest("r", 1, 5))
    assert held == [0]
    assert [job.id for job in claimed] == [b]
    assert claimed[0].lease_token == (store.get_row(b) or {})["lease_token"]
    assert len(calls) == 2 and calls[1] is None  # the second run claimed nothing
    assert (store.get_row(c) or {})["status"] == "queued"
    assert (store.get_row(a) or {})["status"] == "success"
