"""Retention (SPEC §9): `codex-runner cleanup [--dry-run]` and the loop inside `serve`.

Order: events, then jobs — terminal jobs finished more than RUNNER_RETENTION_DAYS ago, except the
newest RUNNER_RETENTION_KEEP terminal jobs — then idempotency keys whose job is gone or that
expired, then files no job row owns (logs, run folders, workspaces, git homes) and that have not
changed for `ORPHAN_GRACE_SECONDS`, then the warm-workspace pools and URL mirrors of repos the
catalog no longer has (a mirror only once no kept workspace borrows its objects), then codex's
session transcripts older than RUNNER_RETENTION_DAYS in the runner's CODEX_HOME.

Safe beside live traffic: active jobs are never selected; rows go in transactions of at most
`BATCH` jobs, so an API write waits for one short batch at most (SQLite has one writer); a file is
judged an orphan only after the job table was read, and a job row is always committed before its
files exist, so a new job's files are never taken for orphans. Safe to repeat: a second run finds
nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from codex_runner.config import Settings
from codex_runner.errors import StoreFull
from codex_runner.execution.git import GitError
from codex_runner.execution.gitutil import lock_key, repo_lock
from codex_runner.execution.spares import POOLS
from codex_runner.execution.workspace import TASK_HOME_KINDS, delete_tree
from codex_runner.jobs import ID_PATTERN, TERMINAL, EventType
from codex_runner.logs.location import MARK_PREFIX
from codex_runner.ops.audit import audit_event
from codex_runner.store.engine import read_txn, with_retries, write_txn
from codex_runner.store.instances import InstanceRegistry
from codex_runner.store.records import utcnow
from codex_runner.store.schema import events, idempotency_keys, instances, jobs, locks

if TYPE_CHECKING:
    from codex_runner.runtime import Runtime

log = structlog.get_logger("codex_runner.retention")

BATCH = 500
ORPHAN_GRACE_SECONDS = 300
# The git HOME of a background task (a start-up prewarm, a mirror's upkeep) is removed by the task
# itself; one left by a crash is removed once this old, far past any task's run (a big repack).
TASK_HOME_GRACE_SECONDS = 24 * 3600
LOCK_NAME = "retention"
# Between batches: lets queued API writers take the (SQLite) write lock.
BATCH_PAUSE_SECONDS = 0.01
# How often an instance looks whether a run is due; the lock says whether it is.
MAX_POLL_SECONDS = 300
RETRY_AFTER_FAILURE_SECONDS = 300
# A mirror whose lock is held this long is being used after all: left for the next run.
MIRROR_LOCK_SECONDS = 5.0
# A mirror being removed is renamed `.<name>.git.<hex>.doomed` first (not `.tmp`: a first clone's
# temporary folder, which only the next clone of that repo sweeps).
_DOOMED = ".doomed"
# A spare pool renamed away before its deletion (`_discard_pool`): `.<name>.<hex>.discard`.
_DISCARDED = ".discard"

_TERMINAL = sorted(s.value for s in TERMINAL)
_TASK_HOME = re.compile(rf"^(?:{'|'.join(TASK_HOME_KINDS)})-[0-9a-f]{{12}}$")
#: Instance rows one pass looks at (and so deletes at most): a bounded statement; many starts a day
#: under the default RUNNER_ID are still cleared by a daily pass.
_INSTANCES_PER_PASS = 1000
_JOB_ID = re.compile(rf"^({ID_PATTERN})(?:\.|$)")


@dataclass
class CleanupReport:
    dry_run: bool
    jobs: int = 0
    events: int = 0
    idempotency_keys: int = 0
    logs: int = 0
    run_dirs: int = 0
    workspaces: int = 0
    git_homes: int = 0
    spare_pools: int = 0
    mirrors: int = 0
    codex_transcripts: int = 0
    log_marks: int = 0
    instances: int = 0
    batches: int = 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (
            f"{verb} {self.jobs} jobs, {self.events} events, {self.idempotency_keys} idempotency keys, "
            f"{self.logs} log files, {self.run_dirs} run folders, {self.workspaces} workspaces, "
            f"{self.git_homes} git homes, {self.spare_pools} spare pools, {self.mirrors} mirrors, "
            f"{self.codex_transcripts} codex transcripts, {self.log_marks} log-folder marks, "
            f"{self.instances} instance rows"
        )


def cleanup(
    runtime: Runtime,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    batch_size: int = BATCH,
    orphan_grace_seconds: int = ORPHAN_GRACE_SECONDS,
    shared_caches: bool = True,
) -> CleanupReport:
    """One retention pass (SPEC §9). `shared_caches` false leaves spare pools and mirrors alone:
    which ones are unused only the configuration of the servers that use them can tell, and the
    `cleanup` command, run beside a live server, may have another runner.toml or none."""
    now = now or utcnow()
    s = runtime.settings
    report = CleanupReport(dry_run=dry_run)
    conds = with_retries(
        lambda: _expired_conditions(runtime.engine, now - timedelta(days=s.retention_days), s.retention_keep)
    )
    doomed: set[str] = set()  # a dry run's expired jobs: their files count as orphans too
    if conds is not None:
        if dry_run:
            doomed = with_retries(lambda: _expired_ids(runtime.engine, conds))
            report.jobs, report.events = with_retries(lambda: _count_expired(runtime.engine, conds))
        else:
            try:
                _delete_jobs(runtime, conds, batch_size, report)
            except StoreFull:
                # Deleting rows needs room (SQLite writes its WAL first): on a full disk, which the
                # logs may well have filled, the expired jobs' files go first, then their rows.
                expired = with_retries(lambda: _expired_ids(runtime.engine, conds))
                log.warning("cleanup_files_first", reason="database_disk_full", jobs=len(expired))
                _remove_orphans(runtime, now, orphan_grace_seconds, batch_size, expired, dry_run, report)
                _delete_jobs(runtime, conds, batch_size, report)
            runtime.jobs.fold_counts()  # a delta per deleted job (PostgreSQL): list totals sum them
    report.idempotency_keys += _delete_keys(runtime.engine, now, batch_size, dry_run, doomed)
    _remove_orphans(runtime, now, orphan_grace_seconds, batch_size, doomed, dry_run, report)
    # Counted only once gone: what could not be removed is an error (the command exits 1).
    for path in _stale_task_homes(runtime, now):
        if dry_run or _rmtree(path, report):
            report.git_homes += 1
    # First: pools of an earlier run whose deletion failed part way, counted once gone.
    for leftover in _left_behind(runtime.settings.workspace_dir / POOLS, _DISCARDED) if shared_caches else ():
        if dry_run or _rmtree(leftover, report):
            report.spare_pools += 1
    dropped_pools = []
    for pool in _unused_spare_pools(runtime) if shared_caches else ():
        if dry_run or _discard_pool(pool, report):
            report.spare_pools += 1
            dropped_pools.append(pool)  # a pool still there may still borrow a mirror's objects
    for mirror in _unused_mirrors(runtime, dropped_pools) if shared_caches else ():
        if dry_run or _remove_mirror(runtime, mirror, dropped_pools, report):
            report.mirrors += 1
    if shared_caches and not dry_run:
        for leftover in _left_behind(runtime.settings.mirrors_dir, _DOOMED):  # a removal that failed part way
            _rmtree(leftover, report)
    _delete_transcripts(runtime, now, dry_run, report)
    for mark in _unused_log_marks(runtime, now, orphan_grace_seconds, doomed):
        try:
            if not dry_run:
                mark.unlink(missing_ok=True)
        except OSError as exc:
            report.errors.append(f"{mark}: {exc.strerror or exc}")
            continue
        report.log_marks += 1
    report.instances = with_retries(
        lambda: _delete_gone_instances(
            runtime.engine, now - timedelta(days=s.retention_days), dry_run, doomed
        )
    )
    log.info("cleanup_done", **report.to_dict())
    return report


def _delete_gone_instances(engine: Engine, cutoff: datetime, dry_run: bool, doomed: set[str]) -> int:
    """Deletes the rows of instances stopped, or silent (a crash), since before `cutoff` that no
    remaining job names: with the default RUNNER_ID every start adds one. After the jobs' deletion,
    so that the jobs it removed no longer count; a dry run's `doomed` jobs count as gone. A row
    named by a job stays: recovery and `log_not_here` tell by it where that job ran."""
    gone = sa.func.coalesce(instances.c.stopped_at, instances.c.heartbeat_at) < cutoff
    with write_txn(engine, op="retention.delete_instances", idempotent=True) as conn:
        query = sa.select(instances.c.id).where(gone).order_by(instances.c.id).limit(_INSTANCES_PER_PASS)
        candidates = list(conn.execute(query).scalars())
        if not candidates:
            return 0
        named = _named_by_jobs(conn, candidates, doomed)
        unused = [name for name in candidates if name not in named]
        if not unused or dry_run:
            return len(unused)
        # `gone` again: an instance that started again under the same id meanwhile stays.
        return int(conn.execute(instances.delete().where(instances.c.id.in_(unused), gone)).rowcount)


def _remove_orphans(
    runtime: Runtime,
    now: datetime,
    grace_seconds: int,
    batch_size: int,
    doomed: set[str],
    dry_run: bool,
    report: CleanupReport,
) -> None:
    """Files of jobs that have no row, or whose row is `doomed`; counted once gone."""
    for kind, path in _orphans(runtime, now, grace_seconds, batch_size, doomed):
        if not dry_run:
            try:
                _remove(path)
            except OSError as exc:
                report.errors.append(f"{path}: {exc.strerror or exc}")
                continue
        setattr(report, kind, getattr(report, kind) + 1)


# -- rows -------------------------------------------------------------------------------------


def _expired_conditions(engine: Engine, cutoff: datetime, keep: int) -> list[sa.ColumnElement[bool]] | None:
    """The WHERE of expired jobs, or None when nothing can expire. The boundary of the newest
    `keep` is read once: jobs finishing later are newer still, so it never moves backwards."""
    conds: list[sa.ColumnElement[bool]] = [jobs.c.status.in_(_TERMINAL), jobs.c.finished_at < cutoff]
    if keep <= 0:
        return conds
    with read_txn(engine) as conn:
        oldest_kept = conn.execute(
            sa.select(jobs.c.finished_at, jobs.c.id)
            .where(jobs.c.status.in_(_TERMINAL), jobs.c.finished_at.is_not(None))
            .order_by(jobs.c.finished_at.desc(), jobs.c.id.desc())
            .offset(keep - 1)
            .limit(1)
        ).first()
    if oldest_kept is None:
        return None
    older = sa.or_(
        jobs.c.finished_at < oldest_kept.finished_at,
        sa.and_(jobs.c.finished_at == oldest_kept.finished_at, jobs.c.id < oldest_kept.id),
    )
    return [*conds, older]


def _expired_ids(engine: Engine, conds: Sequence[sa.ColumnElement[bool]]) -> set[str]:
    with read_txn(engine) as conn:
        return set(conn.execute(sa.select(jobs.c.id).where(*conds)).scalars())


def _count_expired(engine: Engine, conds: Sequence[sa.ColumnElement[bool]]) -> tuple[int, int]:
    with read_txn(engine) as conn:
        ids = sa.select(jobs.c.id).where(*conds).scalar_subquery()
        n_jobs = conn.execute(sa.select(sa.func.count()).select_from(jobs).where(*conds)).scalar_one()
        n_events = conn.execute(
            sa.select(sa.func.count()).select_from(events).where(events.c.job_id.in_(ids))
        ).scalar_one()
    return int(n_jobs), int(n_events)


def _delete_jobs(
    runtime: Runtime, conds: Sequence[sa.ColumnElement[bool]], batch_size: int, report: CleanupReport
) -> None:
    def batch() -> tuple[list[str], int, int, int]:
        with write_txn(runtime.engine, op="retention.delete_jobs") as conn:
            ids = list(
                conn.execute(
                    sa.select(jobs.c.id)
                    .where(*conds)
                    .order_by(jobs.c.finished_at, jobs.c.id)
                    .limit(batch_size)
                ).scalars()
            )
            if not ids:
                return [], 0, 0, 0
            n_events = conn.execute(events.delete().where(events.c.job_id.in_(ids))).rowcount
            n_keys = conn.execute(
                idempotency_keys.delete().where(idempotency_keys.c.job_id.in_(ids))
            ).rowcount
            # The status is checked again: a row selected above cannot have left a terminal status,
            # but the delete must never be the one statement that could remove an active job.
            n_jobs = conn.execute(
                jobs.delete().where(jobs.c.id.in_(ids), jobs.c.status.in_(_TERMINAL))
            ).rowcount
            return ids, n_events, n_jobs, n_keys

    while True:
        ids, n_events, n_jobs, n_keys = with_retries(batch)
        if not ids or n_jobs == 0:
            return
        report.batches += 1
        report.jobs += n_jobs
        report.events += n_events
        report.idempotency_keys += n_keys
        # One audit line per batch: the job ids are in the service log only as a range.
        audit_event(
            runtime,
            EventType.JOB_CLEANED_UP.value,
            message=f"retention deleted {n_jobs} jobs and {n_events} events",
            meta={"jobs": n_jobs, "events": n_events, "first_job_id": ids[0], "last_job_id": ids[-1]},
        )
        time.sleep(BATCH_PAUSE_SECONDS)


def _delete_keys(engine: Engine, now: datetime, batch_size: int, dry_run: bool, doomed: set[str]) -> int:
    gone = ~sa.exists(sa.select(jobs.c.id).where(jobs.c.id == idempotency_keys.c.job_id))
    stale = sa.or_(idempotency_keys.c.expires_at <= now, gone)
    if dry_run:

        def count() -> int:
            with read_txn(engine) as conn:
                rows = conn.execute(sa.select(idempotency_keys.c.job_id, stale.label("stale"))).all()
                return sum(1 for r in rows if r.stale or r.job_id in doomed)

        return with_retries(count)
    # Stale again in the delete itself: on PostgreSQL a create may reuse an expired key between the
    # select and the delete (it takes no lock the sweep takes), and its fresh row must stay.
    delete = idempotency_keys.delete().where(
        idempotency_keys.c.user == sa.bindparam("u"), idempotency_keys.c.key == sa.bindparam("k"), stale
    )

    def batch() -> int:
        with write_txn(engine, op="retention.delete_keys") as conn:
            rows = conn.execute(
                sa.select(idempotency_keys.c.user, idempotency_keys.c.key).where(stale).limit(batch_size)
            ).all()
            if rows:
                conn.execute(delete, [{"u": r.user, "k": r.key} for r in rows])
            return len(rows)

    total = 0
    while n := with_retries(batch):
        total += n
        if n < batch_size:
            break
        time.sleep(BATCH_PAUSE_SECONDS)
    return total


# -- files ------------------------------------------------------------------------------------


def _candidates(runtime: Runtime) -> Iterator[tuple[str, str, Path]]:
    """(kind, job id, path) of every file or folder named after a job. Anything else is not ours."""
    s = runtime.settings
    seen: set[Path] = set()
    # The logs, and their page indexes (`<job id>.log.<version>.idx`, made by log reads).
    for root in (s.log_dir, s.data_dir / "log-index"):
        if root.is_dir():
            for path in root.rglob("*"):
                m = _JOB_ID.match(path.name)
                if m and path not in seen and (path.is_file() or path.is_symlink()):
                    seen.add(path)
                    yield "logs", m[1], path
    for kind, root in (
        ("run_dirs", s.runs_dir),
        ("workspaces", s.workspace_dir),
        ("git_homes", s.data_dir / "git-home"),
    ):
        if root.is_dir():
            for path in root.iterdir():
                m = _JOB_ID.match(path.name)
                if m and m[1] == path.name:
                    yield kind, m[1], path


def _stale_task_homes(runtime: Runtime, now: datetime) -> Iterator[Path]:
    root = runtime.settings.data_dir / "git-home"
    if not root.is_dir():
        return
    cutoff = now.timestamp() - TASK_HOME_GRACE_SECONDS
    for path in root.iterdir():
        if _TASK_HOME.match(path.name) and not path.is_symlink() and path.lstat().st_mtime < cutoff:
            yield path


def _orphans(
    runtime: Runtime, now: datetime, grace_seconds: int, batch_size: int, doomed: set[str]
) -> Iterator[tuple[str, Path]]:
    # Listed before the job table is read: a job's row is committed before its first file exists.
    found = list(_candidates(runtime))
    owned = _existing_ids(runtime.engine, {job_id for _, job_id, _ in found}, batch_size) - doomed
    cutoff = now.timestamp() - grace_seconds
    for kind, job_id, path in found:
        if job_id in owned:
            continue
        try:
            if path.lstat().st_mtime > cutoff:
                continue
        except FileNotFoundError:
            continue
        yield kind, path


def _unused_log_marks(
    runtime: Runtime, now: datetime, grace_seconds: int, doomed: set[str]
) -> Iterator[Path]:
    """Log-folder marks (logs/location.py) of instances that no longer run and whose jobs are
    gone: with the default RUNNER_ID every start leaves one. A mark of a live instance, or of one
    a remaining job names (its log is here), stays; so does a fresh one (an instance starting: it
    marks the folder before it registers). A dry run's `doomed` jobs count as gone."""
    s = runtime.settings
    if not s.log_dir.is_dir():
        return
    cutoff = now.timestamp() - grace_seconds
    marks: dict[str, Path] = {}
    for path in s.log_dir.iterdir():
        if path.name.startswith(MARK_PREFIX) and path.is_file() and path.lstat().st_mtime <= cutoff:
            marks[path.name[len(MARK_PREFIX) :]] = path
    if not marks:
        return
    registry = InstanceRegistry(runtime.engine, s.id)
    live = set(with_retries(lambda: registry.live_instances(s.stale_after_seconds)))
    unknown = sorted(marks.keys() - live)

    def named() -> set[str]:
        with read_txn(runtime.engine) as conn:
            return _named_by_jobs(conn, unknown, doomed)

    used = live | with_retries(named)
    for runner_id, path in marks.items():
        if runner_id not in used:
            yield path


def _named_by_jobs(conn: Connection, runner_ids: Sequence[str], doomed: set[str]) -> set[str]:
    """Which of `runner_ids` a remaining job names as the instance that ran it. A dry run's
    `doomed` jobs, which a real run would delete first, do not count."""
    naming = jobs.c.runner_id.in_(runner_ids)
    if not doomed:
        return set(conn.execute(sa.select(jobs.c.runner_id).where(naming).distinct()).scalars())
    rows = conn.execute(sa.select(jobs.c.runner_id, jobs.c.id).where(naming))
    return {runner_id for runner_id, job_id in rows if job_id not in doomed}


def _unused_spare_pools(runtime: Runtime) -> Iterator[Path]:
    """Warm-workspace pools no configured repo and mode would take from (repo removed, its URL or
    mode changed, or spares turned off). Taking a spare is a rename out of the pool, so deleting a
    pool never removes a workspace a job has already taken."""
    root = runtime.settings.workspace_dir / POOLS
    if not root.is_dir():
        return
    wanted = set()
    if runtime.settings.warm_workspaces > 0:
        wanted = {f"{lock_key(r.source)}.{r.workspace}" for r in runtime.catalog.repos.values()}
    for pool in root.iterdir():
        # `.`-names: pools renamed away for deletion (`_discard_pool`), swept apart (`_left_behind`).
        if (
            pool.is_dir()
            and not pool.is_symlink()
            and pool.name not in wanted
            and not pool.name.startswith(".")
        ):
            yield pool


def _unused_mirrors(runtime: Runtime, dropped_pools: Sequence[Path]) -> Iterator[Path]:
    """Mirrors of URL repos the catalog no longer has (removed, or their URL changed) from which no
    workspace still borrows objects. The spares of such a repo are in `dropped_pools`, deleted in the
    same run, so they do not count."""
    s = runtime.settings
    root = s.mirrors_dir
    if not root.is_dir():
        return
    wanted = {
        f"{lock_key(r.source)}.git" for r in runtime.catalog.repos.values() if r.source_type == "git_url"
    }
    for mirror in sorted(root.iterdir()):
        name = mirror.name
        if name in wanted or name.startswith(".") or not name.endswith(".git"):
            continue  # `.<name>.<hex>.tmp`: a first clone in progress, or swept by the next one
        if mirror.is_dir() and not mirror.is_symlink() and not _mirror_in_use(s, mirror, dropped_pools):
            yield mirror


def _mirror_in_use(settings: Settings, mirror: Path, dropped_pools: Sequence[Path]) -> bool:
    """A kept `clone` workspace names the mirror's objects in its alternates; a `worktree` one is
    registered under the mirror's `worktrees/` with the path of its `.git` file."""
    target = (mirror / "objects").resolve()
    dropped = [p.resolve() for p in dropped_pools]
    if settings.workspace_dir.is_dir():
        for ws in settings.workspace_dir.iterdir():
            try:
                lines = (ws / ".git" / "objects" / "info" / "alternates").read_text().splitlines()
            except OSError:
                continue
            if any(line.strip() and Path(line.strip()).resolve() == target for line in lines):
                return True
    registered = mirror / "worktrees"
    if registered.is_dir():
        for entry in registered.iterdir():
            try:
                dot_git = Path((entry / "gitdir").read_text().strip())
            except OSError:
                continue
            if dot_git.exists() and not any(dot_git.resolve().is_relative_to(p) for p in dropped):
                return True
    return False


def _rmtree(path: Path, report: CleanupReport) -> bool:
    """Removes a folder; False, with the error in the report, if any of it could not go."""
    try:
        shutil.rmtree(path)
    except OSError as exc:
        report.errors.append(f"{path}: {exc.strerror or exc}")
        return False
    return True


def _discard_pool(pool: Path, report: CleanupReport) -> bool:
    """Removes a spare pool, renamed out of the way first: a job taking a spare renames it out of
    the pool (another instance's catalog may still use the pool), and a deletion running through
    the pool meanwhile would go on deleting inside the job's workspace. After the rename, a take
    finds no pool (and prepares the usual way); a spare taken before it is no longer in it."""
    discarded = pool.with_name(f".{pool.name}.{uuid.uuid4().hex[:8]}{_DISCARDED}")
    try:
        pool.rename(discarded)
    except FileNotFoundError:
        return True
    except OSError as exc:
        report.errors.append(f"{pool}: {exc.strerror or exc}")
        return False
    return _rmtree(discarded, report)


def _left_behind(root: Path, suffix: str) -> Iterator[Path]:
    """Folders renamed away for deletion (`.<name>.<hex><suffix>`) whose deletion failed part way:
    tried again by the next run."""
    if root.is_dir():
        for path in sorted(root.glob(f".*{suffix}")):
            if path.is_dir() and not path.is_symlink():
                yield path


def _remove_mirror(
    runtime: Runtime, mirror: Path, dropped_pools: Sequence[Path], report: CleanupReport
) -> bool:
    """Deletes an unused mirror under its repo lock (an instance whose catalog still has the repo
    may be fetching into it); renamed first, so no one ever sees half a mirror. False if it was
    busy or came into use, or could not be removed (an error in the report: the renamed folder is
    tried again by the next run)."""
    key = mirror.name.removesuffix(".git")
    try:
        with repo_lock(runtime.settings, key, timeout=MIRROR_LOCK_SECONDS):
            if _mirror_in_use(runtime.settings, mirror, dropped_pools):
                return False
            doomed = mirror.with_name(f".{mirror.name}.{uuid.uuid4().hex[:8]}{_DOOMED}")
            mirror.rename(doomed)
    except (GitError, OSError) as exc:
        log.warning("mirror_not_removed", mirror=mirror.name, error=str(exc)[:200])
        return False
    return _rmtree(doomed, report)


def _delete_transcripts(runtime: Runtime, now: datetime, dry_run: bool, report: CleanupReport) -> None:
    """Codex writes the whole conversation of every run to `sessions/YYYY/MM/DD/rollout-*.jsonl` in
    its CODEX_HOME. In the runner's CODEX_HOME (RUNNER_CODEX_HOME, or `<data dir>/codex-home`; not
    one the operator passes through as CODEX_HOME) those older than RUNNER_RETENTION_DAYS go, with
    the day folders they leave empty."""
    s = runtime.settings
    if s.codex_home is None and os.environ.get("CODEX_HOME"):
        return
    sessions = (s.codex_home or s.data_dir / "codex-home") / "sessions"
    if not sessions.is_dir() or sessions.is_symlink():
        return
    cutoff = (now - timedelta(days=s.retention_days)).timestamp()
    # Codex may be making today's folder this very moment: only folders of days well past go.
    settled = (now - timedelta(days=2)).strftime("%Y-%m-%d")
    # Bottom-up and without following links: a folder is looked at after its files went.
    for folder, _dirs, files in os.walk(sessions, topdown=False):
        here = Path(folder)
        for name in files:
            path = here / name
            if not (name.startswith("rollout-") and name.endswith(".jsonl")):
                continue
            try:
                info = path.lstat()
                if not stat.S_ISREG(info.st_mode) or info.st_mtime >= cutoff:
                    continue
                if not dry_run:
                    path.unlink()
            except OSError as exc:
                report.errors.append(f"{path}: {exc.strerror or exc}")
                continue
            report.codex_transcripts += 1
        if not dry_run and _period_end(here.relative_to(sessions).parts) < settled:
            with contextlib.suppress(OSError):
                here.rmdir()  # only succeeds when empty


def _period_end(parts: tuple[str, ...]) -> str:
    """The last day a `YYYY[/MM[/DD]]` folder of codex's sessions can hold, as `YYYY-MM-DD`; "~"
    (later than any date) for anything else, which is never removed."""
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        return "~"
    return "-".join((*parts, *("12", "31")[len(parts) - 1 :]))


def _existing_ids(engine: Engine, ids: Iterable[str], batch_size: int) -> set[str]:
    pending = sorted(ids)
    owned: set[str] = set()
    for i in range(0, len(pending), batch_size):
        chunk = pending[i : i + batch_size]

        def query(chunk: list[str] = chunk) -> list[str]:
            with read_txn(engine) as conn:
                return list(conn.execute(sa.select(jobs.c.id).where(jobs.c.id.in_(chunk))).scalars())

        owned.update(with_retries(query))
    return owned


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        # A worktree's registration in its source repo is pruned by the next `git worktree prune`.
        # What a job locked (`chmod 000`) is opened up: only root's rmtree got through it.
        delete_tree(path)


# -- the loop inside serve --------------------------------------------------------------------


def try_lock(conn: Connection, name: str, holder: str, until: datetime, now: datetime) -> bool:
    """Takes the named lock if it is free or expired, holding it until `until`. Not even its holder
    takes it again before then: the expiry is the schedule. A lock that expires after `until` was
    taken for a much longer hold than this caller's (an instance that ran with a longer interval,
    before a restart with a shorter one): past twice this caller's hold it counts as expired, or
    the shorter interval would only take effect once the old hold ran out, up to a day later.
    Twice, not once: a lock just taken by an instance whose clock runs a little ahead expires a
    little after `until`, and must still hold."""
    row = conn.execute(sa.select(locks).where(locks.c.name == name)).first()
    if row is None:
        conn.execute(locks.insert().values(name=name, holder=holder, expires_at=until))
        return True
    if now < row.expires_at <= until + (until - now):
        return False
    updated = conn.execute(
        locks.update()
        .where(locks.c.name == name, locks.c.holder == row.holder, locks.c.expires_at == row.expires_at)
        .values(holder=holder, expires_at=until)
    ).rowcount
    return bool(updated == 1)


def claim_run(engine: Engine, holder: str, interval_seconds: int, now: datetime | None = None) -> bool:
    """True when this instance should run the cleanup now. The lock's expiry doubles as the
    schedule: the winner holds it for a whole interval, so one run happens per interval across
    all instances, and a crashed run is retried after that interval."""
    now = now or utcnow()

    def txn() -> bool:
        with write_txn(engine, op="retention.claim_run") as conn:
            return try_lock(conn, LOCK_NAME, holder, now + timedelta(seconds=interval_seconds), now)

    try:
        return with_retries(txn)
    except sa.exc.IntegrityError:
        return False  # another instance inserted the lock row first


def _retry_soon(engine: Engine, holder: str, seconds: int) -> None:
    def txn() -> None:
        with write_txn(engine, op="retention.retry_soon") as conn:
            conn.execute(
                locks.update()
                .where(locks.c.name == LOCK_NAME, locks.c.holder == holder)
                .values(expires_at=utcnow() + timedelta(seconds=seconds))
            )

    with_retries(txn)


async def retention_loop(runtime: Runtime) -> None:
    """Runs until cancelled: every RUNNER_RETENTION_INTERVAL_SECONDS one instance cleans up."""
    s = runtime.settings
    poll = min(s.retention_interval_seconds, MAX_POLL_SECONDS)
    while True:
        try:
            if await asyncio.to_thread(claim_run, runtime.engine, s.id, s.retention_interval_seconds):
                report = await asyncio.to_thread(cleanup, runtime)
                if report.errors:
                    log.warning("cleanup_errors", errors=report.errors[:10], count=len(report.errors))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("cleanup_failed", error_type=type(exc).__name__)
            try:
                retry = min(RETRY_AFTER_FAILURE_SECONDS, s.retention_interval_seconds)
                await asyncio.to_thread(_retry_soon, runtime.engine, s.id, retry)
            except Exception as again:
                log.warning("cleanup_lock_update_failed", error_type=type(again).__name__)
        await asyncio.sleep(poll)
