"""Retention on SQLite and PostgreSQL: exactly the right rows and files go, nothing active is
touched, a second run changes nothing, a dry run changes nothing, and live API traffic sees no
error while it runs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from test_git_workspace import Repo, git, make_repo

from codex_runner.api import create_app
from codex_runner.config import load_settings
from codex_runner.execution.gitutil import lock_key
from codex_runner.execution.spares import POOLS, stop_refills, wait_for_refills
from codex_runner.execution.workspace import cleanup_workspace, prepare_workspace
from codex_runner.ops import retention
from codex_runner.ops.audit import attach
from codex_runner.ops.retention import claim_run, cleanup, retention_loop
from codex_runner.runtime import Runtime
from codex_runner.store.records import utcnow
from codex_runner.store.schema import events, idempotency_keys, jobs

from tests.helpers import CLI, serve_app, unprivileged, write_scratch_echo_config

TERMINAL = ("success", "failed", "canceled", "timeout")
ACTIVE = ("queued", "running", "cancel_requested")
DAY = 86400


def make_runtime(tmp_path: Path, database_url: str, extra_toml: str = "", **env: str) -> Runtime:
    write_scratch_echo_config(tmp_path)
    with (tmp_path / "runner.toml").open("a") as fh:
        fh.write(extra_toml)
    base = {
        "RUNNER_DATABASE_URL": database_url,
        "RUNNER_DATA_DIR": str(tmp_path / "data"),
        "RUNNER_ENABLED": "false",
        "RUNNER_ID": "test-retention",
        "RUNNER_RETENTION_DAYS": "30",
        "RUNNER_RETENTION_KEEP": "200",
        "RUNNER_MAX_QUEUE_SIZE": "10000",
        "RUNNER_MAX_QUEUED_PER_USER": "10000",
        "RUNNER_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
    }
    rt = Runtime.open(load_settings({**base, **env}, cwd=tmp_path))
    attach(rt)
    return rt


@pytest.fixture
def runtime(tmp_path: Path, database_url: str) -> Iterator[Runtime]:
    rt = make_runtime(tmp_path, database_url)
    yield rt
    rt.close()


@dataclass
class Seeded:
    now: datetime
    terminal: list[tuple[str, datetime]]  # (id, finished_at), newest first
    active: list[str]
    expected_jobs: set[str]
    files: dict[str, set[Path]]  # "kept" / "deleted"


def _job_row(job_id: str, status: str, created: datetime, finished: datetime | None) -> dict[str, Any]:
    return {
        "id": job_id,
        "repo_id": "r",
        "repo": "demo",
        "workspace_mode": "scratch",
        "script_key": "echo",
        "args": {"message": "x"},
        "status": status,
        "requested_by": "alice",
        "created_at": created,
        "started_at": created if status != "queued" else None,
        "finished_at": finished,
        "timeout_seconds": 60,
        "attempt": 1,
    }


def _job_files(rt: Runtime, job_id: str, mtime: float) -> set[Path]:
    s = rt.settings
    paths = {
        s.log_dir / f"{job_id}.log",
        s.runs_dir / job_id,
        s.workspace_dir / job_id,
        s.data_dir / "git-home" / job_id,
    }
    (s.log_dir).mkdir(parents=True, exist_ok=True)
    (s.log_dir / f"{job_id}.log").write_bytes(b"output\n")
    (s.runs_dir / job_id).mkdir(parents=True)
    (s.runs_dir / job_id / "manifest.json").write_text("{}")
    (s.workspace_dir / job_id / "src").mkdir(parents=True)
    (s.workspace_dir / job_id / "src" / "a.py").write_text("print(1)\n")
    (s.data_dir / "git-home" / job_id).mkdir(parents=True)
    for p in paths:
        os.utime(p, (mtime, mtime))
    return paths


def seed(rt: Runtime, n_terminal: int = 500, with_files: bool = True) -> Seeded:
    """`n_terminal` terminal jobs finished evenly over 90 days, 9 active jobs created 60 days ago,
    three events each, idempotency keys, and files for all of them plus foreign and fresh ones."""
    now = utcnow()
    s = rt.settings
    old_mtime = time.time() - DAY
    step = timedelta(days=90) / n_terminal
    terminal = [(str(uuid.uuid4()), now - step * i - timedelta(seconds=1)) for i in range(n_terminal)]
    active = [str(uuid.uuid4()) for _ in range(9)]
    rows = [
        _job_row(jid, TERMINAL[i % 4], fin - timedelta(minutes=5), fin)
        for i, (jid, fin) in enumerate(terminal)
    ]
    rows += [_job_row(jid, ACTIVE[i % 3], now - timedelta(days=60), None) for i, jid in enumerate(active)]
    evs = [
        {
            "job_id": r["id"],
            "event_type": t,
            "actor": "system",
            "message": "",
            "meta": {},
            "created_at": r["created_at"],
        }
        for r in rows
        for t in ("job_created", "job_started", "job_failed")
    ]
    cutoff = now - timedelta(days=s.retention_days)
    newest = {
        jid for jid, _ in sorted(terminal, key=lambda t: (t[1], t[0]), reverse=True)[: s.retention_keep]
    }
    kept_terminal = {jid for jid, fin in terminal if fin >= cutoff} | newest
    gone_terminal = [jid for jid, _ in terminal if jid not in kept_terminal]
    keys = [
        # (user, key, job, expires_at, survives)
        ("alice", "k-kept", terminal[0][0], now + timedelta(days=1), True),
        ("alice", "k-expired", terminal[1][0], now - timedelta(seconds=5), False),
        ("bob", "k-gone-job", gone_terminal[0], now + timedelta(days=1), False),
        ("bob", "k-active", active[0], now + timedelta(days=1), True),
    ]
    with rt.engine.begin() as conn:
        conn.execute(jobs.insert(), rows)
        conn.execute(events.insert(), evs)
        conn.execute(
            idempotency_keys.insert(),
            [
                {
                    "user": u,
                    "key": k,
                    "payload_hash": "0" * 64,
                    "job_id": j,
                    "created_at": now,
                    "expires_at": e,
                }
                for u, k, j, e, _ in keys
            ],
        )
    files: dict[str, set[Path]] = {"kept": set(), "deleted": set()}
    if with_files:
        for jid in [*kept_terminal, *active]:
            files["kept"] |= _job_files(rt, jid, old_mtime)
        for jid in gone_terminal:
            files["deleted"] |= _job_files(rt, jid, old_mtime)
        files["deleted"] |= _job_files(rt, str(uuid.uuid4()), old_mtime)  # never had a row
        files["kept"] |= _job_files(rt, str(uuid.uuid4()), time.time())  # too fresh to judge
        notes = s.log_dir / "notes.txt"  # not named after a job: not ours
        notes.write_text("operator notes")
        os.utime(notes, (old_mtime, old_mtime))
        files["kept"].add(notes)
    return Seeded(now, terminal, active, kept_terminal | set(active), files)


def snapshot(rt: Runtime) -> tuple[set[str], int, set[tuple[str, str]], set[Path]]:
    with rt.engine.connect() as conn:
        ids = set(conn.execute(sa.select(jobs.c.id)).scalars())
        n_events = conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one()
        keys = {
            (r.user, r.key) for r in conn.execute(sa.select(idempotency_keys.c.user, idempotency_keys.c.key))
        }
    s = rt.settings
    files = {
        p
        for root in (s.log_dir, s.runs_dir, s.workspace_dir, s.data_dir / "git-home")
        if root.exists()
        for p in root.iterdir()
    }
    return ids, int(n_events), keys, files


def audit_lines(rt: Runtime, event_type: str) -> list[dict[str, Any]]:
    path = rt.settings.audit_log
    assert path is not None
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event_type"] == event_type]


def test_cleanup_removes_exactly_the_expired(runtime: Runtime) -> None:
    seeded = seed(runtime)
    before = snapshot(runtime)

    dry = cleanup(runtime, dry_run=True, batch_size=64)
    assert snapshot(runtime) == before, "a dry run changed something"
    expected_gone = 500 - (len(seeded.expected_jobs) - len(seeded.active))
    assert expected_gone > 250  # the fixture really exercises both the age and the keep rule
    assert (dry.jobs, dry.events, dry.idempotency_keys) == (expected_gone, 3 * expected_gone, 2)
    assert dry.logs == expected_gone + 1 and dry.workspaces == expected_gone + 1

    report = cleanup(runtime, batch_size=64)
    ids, n_events, keys, files = snapshot(runtime)
    assert ids == seeded.expected_jobs
    assert set(seeded.active) <= ids
    # List totals (kept by the store, possibly in a counts table) agree with what is left.
    assert runtime.jobs.list_jobs(limit=1)[1] == len(ids)
    successes = {jid for i, (jid, _) in enumerate(seeded.terminal) if i % 4 == 0} & ids
    assert runtime.jobs.list_jobs(limit=1, statuses=["success"])[1] == len(successes)
    assert n_events == 3 * len(ids)
    assert keys == {("alice", "k-kept"), ("bob", "k-active")}
    assert (report.jobs, report.events) == (expected_gone, 3 * expected_gone)
    # The key of a deleted job goes with its batch; the expired one in the key sweep.
    assert report.idempotency_keys == 2
    assert (report.logs, report.run_dirs, report.workspaces, report.git_homes) == (expected_gone + 1,) * 4
    assert report.errors == []
    assert files == {p for p in seeded.files["kept"]}
    assert not any(p.exists() for p in seeded.files["deleted"])
    # One audit line per batch, not per job.
    batches = audit_lines(runtime, "job_cleaned_up")
    assert len(batches) == report.batches == -(-expected_gone // 64)
    assert sum(b["meta"]["jobs"] for b in batches) == expected_gone

    after = snapshot(runtime)
    again = cleanup(runtime, batch_size=64)
    assert snapshot(runtime) == after
    assert (again.jobs, again.events, again.idempotency_keys, again.logs, again.workspaces) == (0, 0, 0, 0, 0)


def test_cleanup_removes_the_log_indexes_of_deleted_jobs(runtime: Runtime) -> None:
    seeded = seed(runtime, with_files=False)
    index_dir = runtime.settings.data_dir / "log-index"
    index_dir.mkdir(parents=True, exist_ok=True)
    old = time.time() - DAY
    indexes = {}
    for job_id, _ in seeded.terminal:
        path = index_dir / f"{job_id}.log.v2.idx"
        path.write_bytes(b"index")
        os.utime(path, (old, old))
        indexes[job_id] = path
    foreign = index_dir / "notes.txt"
    foreign.write_text("not a job's")
    cleanup(runtime)
    assert {job_id for job_id, path in indexes.items() if path.exists()} == (
        set(indexes) & seeded.expected_jobs
    )
    assert len(set(indexes) - seeded.expected_jobs) > 10 and foreign.exists()


def test_keep_protects_the_newest_even_when_all_are_old(tmp_path: Path, database_url: str) -> None:
    rt = make_runtime(tmp_path, database_url, RUNNER_RETENTION_DAYS="0", RUNNER_RETENTION_KEEP="7")
    try:
        seeded = seed(rt, n_terminal=20, with_files=False)
        cleanup(rt)
        ids = snapshot(rt)[0]
        assert ids == {jid for jid, _ in seeded.terminal[:7]} | set(seeded.active)
    finally:
        rt.close()


def test_cleanup_under_api_traffic(runtime: Runtime) -> None:
    seeded = seed(runtime, with_files=False)
    admin, _ = runtime.tokens.create("root", "admin")
    errors: list[str] = []
    created: list[str] = []
    stop = threading.Event()

    def traffic(n: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as c:
            i = 0
            while not stop.is_set():
                i += 1
                body = {"repo": "demo", "script_key": "echo", "args": {"message": f"t{n}-{i}"}}
                headers = {"Idempotency-Key": f"t{n}-{i // 2}"} if i % 3 == 0 else {}
                r = c.post("/api/runner/jobs", json=body, headers=headers)
                if r.status_code not in (200, 201, 409):
                    errors.append(f"create {r.status_code} {r.text[:200]}")
                    continue
                if r.status_code in (200, 201):
                    job_id = r.json()["id"]
                    created.append(job_id)
                    if (g := c.get(f"/api/runner/jobs/{job_id}")).status_code != 200:
                        errors.append(f"get {g.status_code}")
                old = seeded.terminal[(n * 37 + i) % len(seeded.terminal)][0]
                if (g := c.get(f"/api/runner/jobs/{old}")).status_code not in (200, 404):
                    errors.append(f"get old {g.status_code}")
                if (lst := c.get("/api/runner/jobs", params={"limit": 20})).status_code != 200:
                    errors.append(f"list {lst.status_code}")

    with serve_app(create_app(runtime)) as url:
        threads = [threading.Thread(target=traffic, args=(n,), daemon=True) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        report = cleanup(runtime, batch_size=25)
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(timeout=30)
            assert not t.is_alive()
    assert errors == []
    assert report.jobs == 500 - (len(seeded.expected_jobs) - len(seeded.active))
    assert len(created) > 0
    ids = snapshot(runtime)[0]
    assert set(created) <= ids and seeded.expected_jobs <= ids
    assert not (ids - set(created)) - seeded.expected_jobs


def test_lock_lets_one_instance_run_per_interval(runtime: Runtime) -> None:
    now = utcnow()
    assert claim_run(runtime.engine, "a", 60, now)
    assert not claim_run(runtime.engine, "b", 60, now + timedelta(seconds=30))
    assert not claim_run(runtime.engine, "a", 60, now + timedelta(seconds=30))  # not before its time
    assert claim_run(runtime.engine, "b", 60, now + timedelta(seconds=61))
    assert not claim_run(runtime.engine, "a", 60, now + timedelta(seconds=62))


def test_a_shorter_interval_takes_effect_at_once(runtime: Runtime) -> None:
    """The lock's expiry is the schedule, and it used to be honoured even when it lay further ahead
    than the current interval: after a restart with RUNNER_RETENTION_INTERVAL_SECONDS lowered from
    a day to a minute, no cleanup ran until the day-long hold taken before the restart ran out. A
    hold past twice the caller's interval now counts as due; one within it still does not."""
    now = utcnow()
    assert claim_run(runtime.engine, "a", DAY, now)
    assert not claim_run(runtime.engine, "a", DAY, now + timedelta(seconds=30))
    assert claim_run(runtime.engine, "a", 60, now + timedelta(seconds=30))  # restarted with 60 s
    assert not claim_run(runtime.engine, "a", 60, now + timedelta(seconds=60))
    assert not claim_run(runtime.engine, "b", 60, now + timedelta(seconds=60))
    assert claim_run(runtime.engine, "b", 60, now + timedelta(seconds=91))


def test_a_lock_just_taken_by_a_clock_a_little_ahead_still_holds(runtime: Runtime) -> None:
    """The shorter-interval rule took any hold past this caller's interval as due: an instance whose
    clock ran 1 s behind took the lock another had just taken, and the cleanup ran twice."""
    now = utcnow()
    assert claim_run(runtime.engine, "a", 60, now)
    assert not claim_run(runtime.engine, "b", 60, now - timedelta(seconds=1) + timedelta(seconds=0.5))


def test_retention_loop_runs_inside_serve(tmp_path: Path, database_url: str) -> None:
    rt = make_runtime(
        tmp_path,
        database_url,
        RUNNER_RETENTION_INTERVAL_SECONDS="1",
        RUNNER_RETENTION_DAYS="0",
        RUNNER_RETENTION_KEEP="0",
    )
    try:
        seeded = seed(rt, n_terminal=30, with_files=False)

        async def run() -> None:
            task = asyncio.create_task(retention_loop(rt))
            try:
                deadline = time.monotonic() + 20
                while snapshot(rt)[0] != set(seeded.active):
                    assert time.monotonic() < deadline, "the retention loop did not clean up in 20 s"
                    assert not task.done(), task
                    await asyncio.sleep(0.05)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(task, timeout=10)

        asyncio.run(run())
        assert audit_lines(rt, "job_cleaned_up")
    finally:
        rt.close()


def test_cleanup_removes_spare_pools_no_repo_would_take_from(tmp_path: Path, database_url: str) -> None:
    rt = make_runtime(tmp_path, database_url)
    try:
        [demo] = rt.catalog.repos.values()
        pools = rt.settings.workspace_dir / POOLS
        wanted = pools / f"{lock_key(demo.source)}.{demo.workspace}"
        gone = [pools / f"{lock_key(demo.source)}.clone", pools / "removed-repo-0123456789ab.worktree"]
        for pool in (wanted, *gone):
            (pool / "ready-0123456789ab").mkdir(parents=True)
            (pool / "ready-0123456789ab" / "f.txt").write_text("x")

        dry = cleanup(rt, dry_run=True)
        assert dry.spare_pools == 2 and all(p.exists() for p in (wanted, *gone))
        assert cleanup(rt).spare_pools == 2
        assert wanted.exists() and not any(p.exists() for p in gone)
        assert cleanup(rt).spare_pools == 0
        rt.settings = dataclasses.replace(rt.settings, warm_workspaces=0)  # spares turned off
        assert cleanup(rt).spare_pools == 1 and not wanted.exists()
    finally:
        rt.close()


def test_a_pool_is_renamed_away_before_it_is_deleted(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job of another instance (whose catalog still uses the pool) may take a spare while the
    pool is deleted: `rmtree`, holding the spare's folder open, went on deleting inside it after the
    job renamed it into its workspace. The pool is renamed first: a take then finds nothing (and
    prepares the usual way) instead of a half-deleted workspace."""
    rt = make_runtime(tmp_path, database_url)
    try:
        pools = rt.settings.workspace_dir / POOLS
        pool = pools / "removed-repo-0123456789ab.clone"
        spare = pool / "ready-0123456789ab"
        spare.mkdir(parents=True)
        for i in range(5):
            (spare / f"f{i}.txt").write_text("x")
        taken = rt.settings.workspace_dir / "11111111-take"
        outcome: dict[str, Any] = {}
        real_rmtree = retention.shutil.rmtree

        def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
            inside = Path(path) / spare.name
            if inside.is_dir():
                fd = os.open(inside, os.O_RDONLY)  # as rmtree holds the folders it walks
                try:
                    try:
                        os.rename(spare, taken)  # the other instance's take, meanwhile
                        outcome["take"] = "taken"
                    except FileNotFoundError:
                        outcome["take"] = "no pool"
                    for name in os.listdir(fd):
                        os.unlink(name, dir_fd=fd)
                finally:
                    os.close(fd)
            real_rmtree(path, *args, **kwargs)

        monkeypatch.setattr(retention.shutil, "rmtree", rmtree)
        assert cleanup(rt).spare_pools == 1
        assert outcome == {"take": "no pool"}
        assert not pool.exists() and not taken.exists()
        assert not [p for p in pools.iterdir() if p.name.endswith(".discard")]
    finally:
        rt.close()


def test_cleanup_removes_mirrors_of_removed_repos_once_no_workspace_borrows_them(
    tmp_path: Path, database_url: str
) -> None:
    seed = make_repo(tmp_path / "seed")
    origins = {}
    for name in ("kept", "cloned", "treed"):
        origins[name] = tmp_path / f"{name}.git"
        git("clone", "-q", "--bare", str(seed), str(origins[name]))
    only_kept = (
        f'\n[repos.kept]\nsource = "file://{origins["kept"]}"\nworkspace = "clone"\n'  # in the catalog
    )
    rt = make_runtime(tmp_path, database_url, only_kept, RUNNER_ALLOWED_GIT_URL_PREFIXES="file://")
    try:
        s = rt.settings
        kept = Repo("kept", f"file://{origins['kept']}", "git_url", "main", "clone")
        cloned = Repo("cloned", f"file://{origins['cloned']}", "git_url", "main", "clone")
        treed = Repo("treed", f"file://{origins['treed']}", "git_url", "main", "worktree")
        spaces = [
            (repo, prepare_workspace(repo, job_id, s))
            for repo, job_id in ((kept, "11111111-a"), (cloned, "22222222-b"), (treed, "33333333-c"))
        ]
        assert wait_for_refills(30)
        mirrors = {
            repo.id: s.mirrors_dir.resolve() / f"{lock_key(repo.source)}.git"
            for repo in (kept, cloned, treed)
        }
        assert all(m.is_dir() for m in mirrors.values())
        (s.mirrors_dir / ".other.git.0123abcd.tmp").mkdir()  # a first clone in progress: not ours to judge

        # The kept workspaces of the removed repos still borrow their mirrors' objects.
        dry = cleanup(rt, dry_run=True)
        assert dry.mirrors == 0 and dry.spare_pools == 2
        report = cleanup(rt)
        assert report.mirrors == 0 and report.spare_pools == 2
        assert all(m.is_dir() for m in mirrors.values())
        for _, ws in spaces[1:]:
            assert git("status", "--porcelain", cwd=ws.path) == ""  # still whole

        for repo, ws in spaces[1:]:
            cleanup_workspace(ws, repo, s, failed=False)
        assert cleanup(rt, dry_run=True).mirrors == 2 and mirrors["cloned"].is_dir()
        assert cleanup(rt).mirrors == 2
        assert mirrors["kept"].is_dir() and not mirrors["cloned"].exists() and not mirrors["treed"].exists()
        assert (s.mirrors_dir / ".other.git.0123abcd.tmp").is_dir()
        assert cleanup(rt).mirrors == 0
        # A repo added back later simply mirrors again.
        again = prepare_workspace(cloned, "44444444-d", s)
        assert git("rev-parse", "HEAD", cwd=again.path) == git("rev-parse", "HEAD", cwd=seed)
    finally:
        stop_refills(30)
        rt.close()


def _transcript(sessions: Path, day: str, name: str, age_days: float) -> Path:
    path = sessions / day / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"type":"session_meta"}\n')
    then = time.time() - age_days * DAY
    os.utime(path, (then, then))
    return path


def test_cleanup_removes_old_codex_transcripts_of_the_runners_codex_home(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CODEX_HOME", raising=False)
    sessions = runtime.settings.data_dir / "codex-home" / "sessions"
    old = _transcript(sessions, "2020/01/02", "rollout-2020-01-02T10-00-00-a.jsonl", 40)
    old_neighbour = _transcript(sessions, "2020/01/03", "rollout-2020-01-03T10-00-00-b.jsonl", 40)
    keep_other = _transcript(sessions, "2020/01/03", "notes.txt", 40)  # not codex's: never touched
    recent = _transcript(sessions, "2020/01/04", "rollout-2020-01-04T10-00-00-c.jsonl", 3)
    today = sessions / utcnow().strftime("%Y/%m/%d")
    today.mkdir(parents=True)  # codex may be about to write here: an empty folder of today stays
    (sessions / "2020/01/05").mkdir(parents=True)
    elsewhere = runtime.settings.data_dir / "other" / "rollout-x.jsonl"  # not under sessions/
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text("x")
    os.utime(elsewhere, (0, 0))

    dry = cleanup(runtime, dry_run=True)
    assert dry.codex_transcripts == 2 and old.exists() and old_neighbour.exists()
    report = cleanup(runtime)
    assert report.codex_transcripts == 2 and not report.errors
    assert not old.exists() and not old_neighbour.exists()
    assert not old.parent.exists()  # its day folder emptied, and it is long past
    assert keep_other.exists() and recent.exists() and today.is_dir() and elsewhere.exists()
    assert not (sessions / "2020/01/05").exists()
    assert cleanup(runtime).codex_transcripts == 0


def test_cleanup_leaves_a_codex_home_the_operator_passes_through_alone(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = tmp_path / "their-codex-home"
    monkeypatch.setenv("CODEX_HOME", str(theirs))
    old = _transcript(theirs / "sessions", "2020/01/02", "rollout-2020-01-02T10-00-00-a.jsonl", 400)
    assert cleanup(runtime).codex_transcripts == 0 and old.exists()


def test_cleanup_removes_git_homes_that_crashed_background_tasks_left(runtime: Runtime) -> None:
    """A prewarm or a mirror's upkeep removes its own git HOME; a crash in the middle leaves it, and
    it is no job's, so the job sweep never looks at it. Removed once a day old; a running one stays."""
    homes = runtime.settings.data_dir / "git-home"
    old = [homes / "upkeep-0123456789ab", homes / "prewarm-ba9876543210"]
    fresh = homes / "upkeep-aaaaaaaaaaaa"
    other = homes / "upkeep-not-ours"
    for path in (*old, fresh, other):
        (path / ".config").mkdir(parents=True)
    day_ago = time.time() - retention.TASK_HOME_GRACE_SECONDS - 60
    for path in (*old, other):
        os.utime(path, (day_ago, day_ago))

    dry = cleanup(runtime, dry_run=True)
    assert dry.git_homes == 2 and all(p.exists() for p in old)
    report = cleanup(runtime)
    assert report.git_homes == 2 and report.errors == []
    assert not any(p.exists() for p in old)
    assert fresh.exists() and other.exists()


def test_folders_that_could_not_be_removed_are_errors_not_counts(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stale git HOME, an unused spare pool and what is left of a mirror whose removal failed part
    way: each that cannot be removed is an error (the command exits 1), not a count; the mirror's
    renamed folder is tried again by the next run. They were removed with errors ignored, counted
    as deleted, and the renamed mirror was left for good."""
    s = runtime.settings
    home = s.data_dir / "git-home" / "upkeep-0123456789ab"
    pool = s.workspace_dir / POOLS / "gone-repo.clone"
    leftover = s.mirrors_dir / ".gone.git.0123abcd.doomed"
    for path in (home, pool, leftover):
        (path / "sub").mkdir(parents=True)
    day_ago = time.time() - retention.TASK_HOME_GRACE_SECONDS - 60
    os.utime(home, (day_ago, day_ago))
    stuck = {home, pool, leftover}
    real_rmtree = retention.shutil.rmtree

    def is_stuck(path: Path) -> bool:
        # A pool is renamed away (`.<name>.<hex>.discard`) before it is deleted.
        return path in stuck or any(path.name.startswith(f".{p.name}.") for p in stuck)

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        if is_stuck(Path(path)):
            if kwargs.get("ignore_errors"):
                return  # as rmtree does: the error swallowed, the folder still there
            raise PermissionError(1, "Operation not permitted", str(path))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(retention.shutil, "rmtree", rmtree)
    report = cleanup(runtime)
    assert (report.git_homes, report.spare_pools) == (0, 0)
    assert len(report.errors) == 3 and all(e.endswith(": Operation not permitted") for e in report.errors)
    assert home.exists() and leftover.exists()
    [discarded] = [p for p in pool.parent.iterdir() if p.name.startswith(f".{pool.name}.")]
    assert (discarded / "sub").is_dir()  # renamed away, not yet deleted
    stuck.clear()
    report = cleanup(runtime)
    assert (report.git_homes, report.spare_pools, report.errors) == (1, 1, [])
    assert not home.exists() and not pool.exists() and not leftover.exists() and not discarded.exists()


def test_cli_cleanup_exits_1_when_something_could_not_be_removed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What could be removed is; a file that could not be is a warning and exit status 1, so a
    cron job or a script sees that not everything due went."""
    from typer.testing import CliRunner

    from codex_runner.cli import app
    from codex_runner.ops import retention

    s = runtime.settings
    s.log_dir.mkdir(parents=True, exist_ok=True)
    orphan = s.log_dir / "0000abcd-0000-4000-8000-000000000000.log"
    orphan.write_text("no job owns this")
    os.utime(orphan, (0, 0))

    def refuse(path: Path) -> None:
        raise PermissionError(1, "Operation not permitted", str(path))

    real_remove = retention._remove
    monkeypatch.setattr(retention, "_remove", refuse)
    env = {"RUNNER_DATA_DIR": str(s.data_dir), "RUNNER_DATABASE_URL": s.database_url}
    done = CliRunner().invoke(app, ["cleanup"], env=env)
    assert done.exit_code == 1, done.output
    assert "could not remove" in done.output and orphan.exists()
    monkeypatch.setattr(retention, "_remove", real_remove)
    assert CliRunner().invoke(app, ["cleanup"], env=env).exit_code == 0
    assert not orphan.exists()


def test_cleanup_opens_up_a_workspace_the_job_locked_without_root(runtime: Runtime) -> None:
    """A kept workspace (RUNNER_CLEANUP_AFTER_JOB=false, or a cleanup that failed) with folders the
    job locked (`chmod 000`) is retention's to remove. Root does so anyway (CAP_DAC_OVERRIDE); a
    runner of its own user failed on it at every run, for good. Shown without capabilities by
    `codex-runner cleanup` run as such a user would."""
    s = runtime.settings
    orphan = s.workspace_dir / str(uuid.uuid4())
    (orphan / "d" / "e").mkdir(parents=True)
    (orphan / "d" / "e" / "f").touch()
    for folder in (orphan / "d" / "e", orphan / "d", orphan):
        os.utime(folder, (0, 0))
    os.chmod(orphan / "d" / "e", 0)
    os.chmod(orphan / "d", 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env |= {"RUNNER_DATA_DIR": str(s.data_dir), "RUNNER_DATABASE_URL": s.database_url}
    done = subprocess.run(
        [*unprivileged(), CLI, "cleanup", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["workspaces"] == 1 and report["errors"] == [], report
    assert not orphan.exists()


def test_cleanup_dry_run_creates_and_migrates_nothing(tmp_path: Path) -> None:
    """docs/operations.md: `--dry-run` changes nothing; it made (or migrated) the database, which
    under an older server still running is a schema change beneath it."""
    from codex_runner.store import create_store_engine
    from codex_runner.store.migrate import current_revision, head_revision, upgrade

    from tests.integration.ops_cli import run_cli

    data = tmp_path / "data"
    env = {"RUNNER_DATA_DIR": str(data), "RUNNER_ID": "dry", "RUNNER_ENABLED": "false"}
    done = run_cli(["cleanup", "--dry-run"], env, tmp_path)
    assert done.returncode == 2 and "no database at" in done.stderr, done
    assert not (data / "runner.db").exists()
    data.mkdir(exist_ok=True)
    engine = create_store_engine(f"sqlite:///{data / 'runner.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE keep_me (x INTEGER)"))  # an unmigrated database
        done = run_cli(["cleanup", "--dry-run"], env, tmp_path)
        assert done.returncode == 2 and "run `codex-runner migrate`" in done.stderr, done
        assert current_revision(engine) is None
        upgrade(engine)
        done = run_cli(["cleanup", "--dry-run"], env, tmp_path)
        assert done.returncode == 0 and "would delete" in done.stdout, done
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_the_cleanup_command_leaves_a_live_servers_spare_pools_and_mirrors(
    tmp_path: Path, database_url: str
) -> None:
    """`codex-runner cleanup` run without the server's runner.toml (a cron job) judged the server's
    warm-workspace pools and mirrors by its own, empty catalog: all unused. While an instance is
    live they are its own retention's to judge; once none is, the command removes them."""
    from codex_runner.store.instances import InstanceRegistry

    from tests.integration.ops_cli import run_cli

    rt = make_runtime(tmp_path, database_url)
    try:
        [demo] = rt.catalog.repos.values()
        pool = rt.settings.workspace_dir / POOLS / f"{lock_key(demo.source)}.{demo.workspace}"
        (pool / "ready-0123456789ab").mkdir(parents=True)
        server = InstanceRegistry(rt.engine, "the-server")
        server.register(rt.settings.stale_after_seconds)
        cron = tmp_path / "cron"
        cron.mkdir()  # no runner.toml here: the command's catalog has no repo
        env = {
            "RUNNER_DATABASE_URL": database_url,
            "RUNNER_DATA_DIR": str(tmp_path / "data"),
            "RUNNER_ID": "cron",
        }
        done = run_cli(["cleanup", "--json"], env, cron)
        assert done.returncode == 0, done
        assert json.loads(done.stdout)["spare_pools"] == 0 and pool.exists()
        assert "left to the live instance(s) the-server" in done.stderr
        server.stopped()
        done = run_cli(["cleanup", "--json"], env, cron)
        assert done.returncode == 0 and json.loads(done.stdout)["spare_pools"] == 1, done
        assert not pool.exists()
    finally:
        rt.close()


def test_cleanup_removes_the_log_folder_marks_of_instances_gone_with_their_jobs(runtime: Runtime) -> None:
    """Every start under the default RUNNER_ID marks the log folder (logs/location.py): without
    this, one file more per start, for ever. A mark stays while its instance lives, while a job
    names it (its log is here: a read of it must not answer `log_not_here`), and while fresh."""
    from codex_runner.store.instances import InstanceRegistry

    s = runtime.settings
    s.log_dir.mkdir(parents=True, exist_ok=True)
    old = time.time() - DAY
    marks = {name: s.log_dir / f".writer-{name}" for name in ("gone", "live", "has-jobs", "fresh", "doomed")}
    for name, path in marks.items():
        path.touch()
        if name != "fresh":
            os.utime(path, (old, old))
    InstanceRegistry(runtime.engine, "live").register()
    now = utcnow()
    kept_job = _job_row(str(uuid.uuid4()), "success", now - timedelta(days=1), now - timedelta(days=1))
    doomed_job = _job_row(str(uuid.uuid4()), "success", now - timedelta(days=99), now - timedelta(days=99))
    with runtime.engine.begin() as conn:
        conn.execute(
            jobs.insert(), [{**kept_job, "runner_id": "has-jobs"}, {**doomed_job, "runner_id": "doomed"}]
        )
    with runtime.engine.begin() as conn:  # the newest RETENTION_KEEP stay whatever their age
        conn.execute(jobs.insert(), [_job_row(str(uuid.uuid4()), "success", now, now) for _ in range(200)])

    dry = cleanup(runtime, dry_run=True)
    assert dry.log_marks == 2 and all(p.exists() for p in marks.values())
    report = cleanup(runtime)
    assert report.log_marks == 2 and not report.errors
    assert {name for name, path in marks.items() if path.exists()} == {"live", "has-jobs", "fresh"}
    assert cleanup(runtime).log_marks == 0


def test_cleanup_deletes_the_rows_of_instances_gone_for_the_retention_period(runtime: Runtime) -> None:
    """Every start under the default RUNNER_ID (host name + random suffix) adds an instance row:
    without this, one row more per start, for ever, each listed by diagnostics. A row goes once
    its instance has been stopped (or silent) longer than RUNNER_RETENTION_DAYS and no job that
    stays names it; a dry run counts the jobs it would delete as gone."""
    from codex_runner.store.schema import instances

    now = utcnow()
    long_ago, lately = now - timedelta(days=runtime.settings.retention_days + 1), now - timedelta(days=1)

    def row(name: str, heartbeat: datetime, stopped: datetime | None) -> dict[str, Any]:
        return {
            "id": name,
            "host": "h",
            "pid": 1,
            "version": "0",
            "started_at": heartbeat,
            "heartbeat_at": heartbeat,
            "stopped_at": stopped,
        }

    rows = [
        row("stopped-long-ago", long_ago, long_ago),
        row("silent-long-ago", long_ago, None),  # a crash: never marked stopped
        row("stopped-lately", lately, lately),
        row("live", now, None),
        row("named-by-a-kept-job", long_ago, long_ago),
        row("named-by-an-expired-job", long_ago, long_ago),
    ]
    kept_job = _job_row(str(uuid.uuid4()), "success", lately, lately)
    expired_job = _job_row(str(uuid.uuid4()), "success", now - timedelta(days=99), now - timedelta(days=99))
    with runtime.engine.begin() as conn:
        conn.execute(instances.insert(), rows)
        conn.execute(
            jobs.insert(),
            [
                {**kept_job, "runner_id": "named-by-a-kept-job"},
                {**expired_job, "runner_id": "named-by-an-expired-job"},
            ],
        )
        # The newest RETENTION_KEEP stay whatever their age.
        conn.execute(jobs.insert(), [_job_row(str(uuid.uuid4()), "success", now, now) for _ in range(200)])

    def left() -> set[str]:
        with runtime.engine.connect() as conn:
            return set(conn.execute(sa.select(instances.c.id)).scalars()) & {r["id"] for r in rows}

    dry = cleanup(runtime, dry_run=True)
    assert dry.instances == 3 and len(left()) == 6, dry
    report = cleanup(runtime)
    assert report.instances == 3 and not report.errors, report
    assert left() == {"stopped-lately", "live", "named-by-a-kept-job"}
    assert cleanup(runtime).instances == 0
