"""The launcher: claim loop, limits, leases, heartbeats, watchdog, recovery and shutdown.

Readable top to bottom: `start()` recovers what an earlier life left behind, then runs three
loops — claim, heartbeat, watchdog — until `stop()`. docs/crash-safety.md describes the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from codex_runner.errors import CommitOutcomeUnknown, InstanceConflict, StoreFull, StoreUnavailable
from codex_runner.execution.finisher import GroupCommitter
from codex_runner.execution.job import JobRun, queue_wait_seconds
from codex_runner.execution.manifest import MANIFEST_NAME
from codex_runner.execution.process import kill_process_group
from codex_runner.execution.procscan import (
    find_job_processes,
    kill_group,
    kill_job_processes,
    register_workspace_root,
)
from codex_runner.execution.recovery import (
    clean_up_ended_job,
    clean_up_jobs_failed_elsewhere,
    ended_stages,
    record_recovery,
    recovered_message,
)
from codex_runner.execution.spares import resume_refills, stop_refills
from codex_runner.execution.workspace import prewarm_spares
from codex_runner.jobs import RUNNING_LIKE, ErrorCode, EventType, Status
from codex_runner.logs.location import mark_writer
from codex_runner.runtime import Runtime
from codex_runner.store import fullness
from codex_runner.store.instances import InstanceRegistry
from codex_runner.store.jobs import ClaimedJob, ClaimRequest, JobStore, OwnerWrite
from codex_runner.store.records import utcnow

if TYPE_CHECKING:
    import uvicorn

log = structlog.get_logger("codex_runner.launcher")

T = TypeVar("T")

#: How long start-up recovery and a forced exit keep looking for a job's processes after SIGKILL.
KILL_SCAN_SECONDS = 5.0
# How long the watchdog waits for a repo lock to clean up after a job it failed: a pass must not
# stall (other stale jobs, shutdown) behind a job that holds the lock.
WATCHDOG_LOCK_WAIT_SECONDS = 5.0
#: After a job ends, how long until /proc is scanned for its processes that left its group (one scan
#: covers every job that ended meanwhile, so a drain costs at most one scan a second).
ESCAPED_SWEEP_DELAY = 1.0
#: Back-off of an owner write while the database is unavailable (after the store's own retries).
PATIENT_FIRST_DELAY = 0.5
PATIENT_MAX_DELAY = 5.0
#: Bound on waiting for a claim transaction in flight when shutting down.
CLAIM_DRAIN_SECONDS = 30.0

#: What a database outage is (`Launcher._db_down`): it does not answer; its disk is full (it
#: answers reads and refuses writes, until one lands again: `store.fullness`).
UNAVAILABLE = "unavailable"
DISK_FULL = "disk_full"

#: Launchers started in this process, for the forced exit of a second signal.
_LIVE: set[Launcher] = set()


class Launcher:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.settings = runtime.settings
        self.runner_id = runtime.settings.id
        self.registry = InstanceRegistry(runtime.engine, self.runner_id)
        register_workspace_root(self.settings.workspace_dir)
        self.active: dict[str, JobRun] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Canceled jobs in a git stage whose git processes are killed after the grace.
        self._git_cancels: dict[str, asyncio.Future[None]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._stop_task: asyncio.Task[None] | None = None
        # Set once shutdown has waited all it will: owner writes still retrying give up.
        self._abandoned = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Database health as this instance saw it, for the watchdog (see `watchdog_once`). A new
        # instance has not seen the database for long either: if it starts just after an outage,
        # every job looks stale, though their owners beat again within a heartbeat period. Its
        # first passes fail nothing until two heartbeat periods have gone by.
        self._db_down: str | None = None  # UNAVAILABLE, DISK_FULL, or None while it answers
        self._db_ok_since = (
            time.monotonic() - self.settings.stale_after_seconds + 2 * self.settings.heartbeat_seconds
        )
        # Owner writes go through a store that outlasts a database outage (see `_PatientJobStore`).
        self._job_runtime = replace(
            runtime, jobs=_PatientJobStore(runtime.jobs, lambda: not self._abandoned, self._known_jobs)
        )
        # Whoever claims holds this turn (the claim loop, or a batch of terminal writes that claims
        # along), so that two claims never count the same free slots.
        self._claim_turn = asyncio.Lock()
        # The heartbeats' own thread: the default pool is shared with the API (every log stream
        # reads the job's status and its log there, several times a second), and heartbeats queued
        # behind a flood of followers would let other instances' watchdogs fail our live jobs.
        self._beats = ThreadPoolExecutor(1, thread_name_prefix="heartbeat")
        # The jobs' terminal writes, committed together when they end together, with a claim for
        # the slots they free in the same transaction.
        self._finisher = GroupCommitter(self._job_runtime.jobs, _ClaimAlong(self))
        # Jobs that ended since the last scan for processes that escaped their group.
        self._ended: set[str] = set()
        self._ended_wake = asyncio.Event()
        #: Set when another process took this RUNNER_ID over; the launcher then stops itself.
        self.superseded = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        resume_refills()  # an earlier launcher of this process (tests) stopped them
        # Every store call runs in a thread. During a database outage each running job may hold one
        # thread retrying its writes, so the default pool (cores + 4) must not be what limits us:
        # heartbeats and claims need threads of their own.
        self._loop.set_default_executor(
            ThreadPoolExecutor(self.settings.max_concurrency + 8, thread_name_prefix="launcher")
        )
        await asyncio.to_thread(self.registry.register, self.settings.stale_after_seconds)
        try:
            # Before any claim: an API beside this instance tells a log not opened yet from one in
            # another instance's folder by this mark (logs/location.py).
            await asyncio.to_thread(mark_writer, self.settings.log_dir, self.runner_id)
        except OSError as exc:  # jobs still run; `doctor` (folder:log) says what is wrong
            log.warning("log_dir_mark_failed", error=exc.strerror or str(exc))
        await self.recover_own_jobs()
        await self._prewarm_spares()
        self.rt.on_created.append(self._notify_created)
        self.rt.on_cancel.append(self._notify_cancel)
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="claim"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._watchdog_loop(), name="watchdog"),
            asyncio.create_task(self._escaped_loop(), name="escaped"),
        ]
        _LIVE.add(self)
        log.info("launcher_started", runner_id=self.runner_id, max_concurrency=self.settings.max_concurrency)

    async def _prewarm_spares(self) -> None:
        """Warm workspaces for the repos whose objects are already here, built in the background:
        the first job after a restart need not write its whole tree. Never worth failing a start."""
        repos = [r for r in self.rt.catalog.repos.values() if r.enabled]
        try:
            asked = await asyncio.to_thread(prewarm_spares, repos, self.settings)
        except Exception as exc:
            log.warning("spare_prewarm_failed", error_type=type(exc).__name__)
        else:
            if asked:
                log.info("spare_prewarm_requested", repos=asked)

    async def stop(self) -> None:
        """SPEC §3 shutdown: stop claiming, give running jobs the grace to finish, then stop the
        rest and mark them failed with `runner_shutdown`. Safe to call again and from several places
        (the signal handler starts it, the server's lifespan awaits it): all wait for one shutdown."""
        await asyncio.shield(self._start_stopping())

    def begin_stop(self) -> None:
        """Starts `stop()` from a signal handler or another thread; returns at once."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._start_stopping)

    def _start_stopping(self) -> asyncio.Task[None]:
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._shutdown(), name="launcher-stop")
        return self._stop_task

    async def _shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        with contextlib.suppress(ValueError):
            self.rt.on_created.remove(self._notify_created)
        with contextlib.suppress(ValueError):
            self.rt.on_cancel.remove(self._notify_cancel)
        claim = [t for t in self._loops if t.get_name() == "claim"]
        if claim:
            # Not cancelled: a claim transaction in flight keeps running in its thread, and jobs it
            # claims after a cancel would have no one to run them. The loop ends after this pass.
            _, pending = await asyncio.wait(claim, timeout=CLAIM_DRAIN_SECONDS)
            for task in pending:
                task.cancel()
        # Likewise a batch of terminal writes claiming along: its jobs are started, then no more.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._claim_turn.acquire(), CLAIM_DRAIN_SECONDS)
            self._claim_turn.release()
        grace = self.settings.kill_grace_seconds
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=grace)
        for run in list(self.active.values()):
            run.request_stop("shutdown")
        # A stop request reaches a script, not a git command in a worker thread (a clone, a push
        # that may take up to NETWORK_TIMEOUT): those are killed, and their jobs end runner_shutdown.
        # Only the git of a stage (prepare, commit, push), never the cleanup's, which puts an
        # in_place repo back on its branch: killed, it left the repo on the job's branch.
        in_git = {job_id for job_id, run in self.active.items() if run.in_git_stage}
        if in_git:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(kill_job_processes, in_git, timeout=1.0, git_stage_only=True)
        if self._tasks:
            # Heartbeats go on meanwhile, so no watchdog takes these jobs while they stop.
            await asyncio.wait(list(self._tasks.values()), timeout=grace + 5)
        if self.active:
            # Jobs that did not end in time (their status write waiting for a database that is
            # down, say): none of their processes outlives the runner. Their rows stay `running`
            # for the next start of this RUNNER_ID, or another instance's watchdog, to fail.
            await self._kill_left_running()
        with contextlib.suppress(Exception):
            await self.kill_escaped_once()  # nothing a finished job started outlives the runner
        self._abandoned = True
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self.rt.metrics.lock_acquired.set(0)
        # A warm workspace being built finishes (its git process is not left behind); requests
        # for more are dropped, also from a job's prepare that outlives this stop.
        await asyncio.to_thread(stop_refills, float(grace))
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.registry.stopped)
        self._beats.shutdown(wait=False)
        # A fresh one (it makes no thread until used): a launcher started again still beats.
        self._beats = ThreadPoolExecutor(1, thread_name_prefix="heartbeat")
        _LIVE.discard(self)
        log.info("launcher_stopped", runner_id=self.runner_id, left_running=len(self.active))

    async def _kill_left_running(self) -> None:
        left = dict(self.active)
        _kill_live_groups(left.values())
        with contextlib.suppress(Exception):
            await asyncio.to_thread(kill_job_processes, set(left), timeout=1.0)
        log.warning("jobs_left_running_at_shutdown", job_ids=sorted(left))

    def kill_all_now(self) -> None:
        """Second signal: no grace, but no orphan either. SIGKILLs every job's process group, then
        whatever still carries one of our jobs' ids in its environment (a process spawned a moment
        ago, or one that left its group). The job rows stay `running`: the next start of this
        `RUNNER_ID` (or another instance's watchdog) fails them."""
        self._abandoned = True
        _kill_live_groups(self.active.values())
        # Jobs that ended since the last scan for escaped processes too: a daemon of theirs would
        # otherwise outlive the runner until its next start.
        kill_job_processes(set(self.active) | self._ended, timeout=1.0)

    # -- wake-ups from this process (thread-safe: the API runs routes in worker threads) -----

    def _notify_created(self, _job_id: str) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _notify_cancel(self, job_id: str) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._cancel_local, job_id)

    def _cancel_local(self, job_id: str) -> None:
        run = self.active.get(job_id)
        if run is not None:
            run.request_stop("cancel")
            if run.git_killable and job_id not in self._git_cancels:
                # A stop request reaches a script, not git in a worker thread: a clone that never
                # gets an answer would keep the job `cancel_requested` for the 30-minute network
                # timeout. Its git processes get the kill grace, then are killed.
                self._git_cancels[job_id] = asyncio.ensure_future(self._kill_git_after_grace(job_id))

    async def _kill_git_after_grace(self, job_id: str) -> None:
        try:
            deadline = time.monotonic() + self.settings.kill_grace_seconds
            while time.monotonic() < deadline:
                run = self.active.get(job_id)
                if run is None or not run.git_killable:
                    return  # its git stage ended (the stop request reaches what comes next)
                await asyncio.sleep(0.1)
            run = self.active.get(job_id)
            if run is not None and run.git_killable:
                log.warning("killing_git_of_canceled_job", job_id=job_id)
                # Only the stage's git (`RUNNER_GIT_STAGE`): the kill scans again for a second, and
                # the cleanup's git, which starts as soon as the stage fails, must survive it.
                await asyncio.to_thread(kill_job_processes, {job_id}, timeout=1.0, git_stage_only=True)
        except Exception as exc:  # the job's own end still comes, later
            log.warning("git_kill_failed", job_id=job_id, error_type=type(exc).__name__)
        finally:
            self._git_cancels.pop(job_id, None)

    # -- database health --------------------------------------------------------------------

    def _db_ok(self) -> None:
        """The database answered. A full disk's outage ends only once a write lands: reads answer
        all along, and ended it (and logged so) at every watchdog pass while the disk stayed full."""
        if self._db_down is None or (self._db_down == DISK_FULL and fullness.disk_full(self.rt.engine)):
            return
        was, self._db_down = self._db_down, None
        self._db_ok_since = time.monotonic()
        if was == DISK_FULL:
            log.info("database_writable_again", runner_id=self.runner_id)
        else:
            log.info("database_reachable_again", runner_id=self.runner_id)

    def _db_failed(self, exc: BaseException) -> None:
        if not isinstance(exc, StoreUnavailable) or self._db_down == DISK_FULL:
            return
        if isinstance(exc, StoreFull):
            self._db_down = DISK_FULL
            log.warning(
                "database_disk_full",
                runner_id=self.runner_id,
                detail="the database's disk is full: writes are refused and wait until there is room",
            )
        elif self._db_down is None:
            self._db_down = UNAVAILABLE
            log.warning("database_unavailable", runner_id=self.runner_id)

    def _known_jobs(self) -> set[str]:
        """The jobs this instance runs, from any thread (the event loop may change `active` while
        another thread copies it)."""
        for _ in range(10):
            try:
                return set(self.active)
            except RuntimeError:  # changed size during the copy
                continue
        return set(list(self.active))

    # -- claim ------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        poll = self.settings.poll_interval_seconds
        self._last_scheduler_record = self._last_cancel_poll = 0.0
        while not self._stopping:
            self._wake.clear()
            claimed: list[ClaimedJob] = []
            async with self._claim_turn:
                slots = self.settings.max_concurrency - len(self.active)
                # Again here: a stop may have begun while this loop waited for the turn.
                if slots > 0 and not self._stopping:
                    try:
                        # The patient store: a claim whose COMMIT's answer was lost adopts the
                        # jobs it did claim instead of leaving them to the watchdog.
                        claimed = await asyncio.to_thread(
                            self._job_runtime.jobs.claim,
                            self.runner_id,
                            slots=slots,
                            max_jobs_per_user=self.settings.max_jobs_per_user,
                        )
                    except Exception as exc:
                        self._claim_failed(exc)
                    else:
                        self._claimed(claimed)
            now = time.monotonic()
            if claimed and now - self._last_scheduler_record >= poll:
                # Diagnostics only: at most once a poll, not a write per claim.
                self._last_scheduler_record = now
                await self._record_scheduler(poll)
            if claimed and len(claimed) == slots:
                continue  # more may be waiting; a finishing job will wake us
            if now - self._last_cancel_poll >= poll:
                self._last_cancel_poll = now
                await self._poll_cancels()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=poll)
            # One loop turn before claiming, so jobs that finished together free their slots
            # into one claim instead of one claim each.
            await asyncio.sleep(0)

    def _claim_failed(self, exc: BaseException) -> None:
        self._db_failed(exc)
        self.rt.metrics.lock_acquired.set(0)
        log.warning("claim_failed", error_type=type(exc).__name__)

    def _claimed(self, claimed: list[ClaimedJob]) -> None:
        """A claim transaction took the scheduler lock and committed (docs/crash-safety.md): start
        its jobs. Also after `stop()` began: a claimed job is started, never dropped."""
        self._db_ok()
        self.rt.metrics.lock_acquired.set(1)
        for job in claimed:
            self.rt.metrics.queue_wait.observe(queue_wait_seconds(job.row))
            run = JobRun(self._job_runtime, job, self._finisher)
            self.active[job.id] = run
            task = asyncio.create_task(run.run(), name=f"job-{job.id}")
            self._tasks[job.id] = task
            task.add_done_callback(functools.partial(self._job_done, job.id))

    async def _record_scheduler(self, poll: float) -> None:
        # Diagnostics only ("who scheduled last"): never worth failing or delaying a claim for.
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.registry.record_scheduler, poll)

    def _job_done(self, job_id: str, task: asyncio.Task[None] | None = None) -> None:
        self.active.pop(job_id, None)
        self._tasks.pop(job_id, None)
        self._ended.add(job_id)
        self._ended_wake.set()
        if task is not None and not task.cancelled() and task.exception() is not None:
            # JobRun.run never raises but for a write that gave up at a forced exit.
            log.warning("job_task_failed", job_id=job_id, error_type=type(task.exception()).__name__)
        self._wake.set()

    async def _poll_cancels(self) -> None:
        """Cancels requested through another instance reach us here, within one poll."""
        if not self.active:
            return
        try:
            statuses = await asyncio.to_thread(self.rt.jobs.status_of, list(self.active))
        except Exception as exc:
            self._db_failed(exc)
            return
        for job_id, status in statuses.items():
            if status == Status.CANCEL_REQUESTED:
                self._cancel_local(job_id)

    # -- processes that left their job's group ----------------------------------------------

    async def _escaped_loop(self) -> None:
        """A job's group is stopped when its script ends, but a process that left the group (a
        daemon that called setsid) is not in it. Its environment still carries RUNNER_JOB_ID, so
        shortly after jobs end one scan of /proc finds such processes of all of them, and they are
        killed: no job leaves a process behind, and a busy runner pays one scan a second."""
        while True:
            await self._ended_wake.wait()
            await asyncio.sleep(ESCAPED_SWEEP_DELAY)
            try:
                await self.kill_escaped_once()
            except Exception as exc:  # its jobs are looked for again when the next one ends
                log.warning("escaped_process_scan_failed", error_type=type(exc).__name__)

    async def kill_escaped_once(self) -> int:
        """SIGKILLs the live processes of jobs that ended since the last call; returns how many."""
        self._ended_wake.clear()
        ended, self._ended = self._ended, set()
        if not ended:
            return 0
        try:
            return await asyncio.to_thread(_kill_escaped, ended)
        except BaseException:
            self._ended |= ended  # looked for again at the next scan
            raise

    # -- heartbeats -------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            await self.heartbeat_once()

    async def _on_beat_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._beats, functools.partial(fn, *args))

    async def heartbeat_once(self) -> None:
        """Refreshes our jobs' heartbeats. A job whose lease is gone (another instance's watchdog
        failed it) is stopped at once, process group and all, and JobRun writes nothing more to it.
        When the database is unavailable the processes keep running and the next beat tries again."""
        await self._write_owed_manifests()
        leases = {job_id: run.lease for job_id, run in self.active.items() if not run.fenced}
        try:
            alive = await self._on_beat_thread(self.rt.jobs.heartbeat, self.runner_id, leases)
        except Exception as exc:
            self._db_failed(exc)
            log.warning("heartbeat_failed", error_type=type(exc).__name__)
            return
        if leases:
            self._db_ok()
        for job_id, run in list(self.active.items()):
            if job_id not in leases:
                continue
            if job_id not in alive:
                log.warning("lease_lost", job_id=job_id)
                run.request_stop("lease_lost")
            else:
                if alive[job_id] == Status.CANCEL_REQUESTED:
                    self._cancel_local(job_id)
                run.heartbeat_files()  # touched while the job stops too (SPEC §3: every heartbeat)
        # After the jobs: the registry row is for diagnostics, the jobs' heartbeats are what count.
        try:
            mine = await self._on_beat_thread(self.registry.heartbeat)
            # Claims and finishes leave job-count deltas that creates fold; without creates, this.
            await self._on_beat_thread(self.rt.jobs.fold_counts)
        except Exception as exc:
            self._db_failed(exc)  # with no job running, a beat's one write
            return
        self._db_ok()  # writes landed: a full disk has room again
        if not mine and not self._stopping:
            # Another process registered this RUNNER_ID while this one could not heartbeat (frozen
            # past the stale time): it recovered our jobs as its own earlier life's, and two
            # instances of one id must not both claim. This one stops; the other carries on.
            log.error("runner_id_taken_over", runner_id=self.runner_id)
            self.superseded.set()
            self.begin_stop()

    async def _record_recovery(
        self, job: dict[str, Any], error_code: str, stages: list[dict[str, Any]]
    ) -> None:
        """The run manifest of a job a recovery failed says so; one a full disk refuses is owed."""
        await asyncio.to_thread(
            record_recovery,
            job,
            self.settings,
            error_code=error_code,
            stages=stages,
            owed=self._finisher.owed_manifests,
        )

    async def _write_owed_manifests(self) -> None:
        """Terminal manifests a full disk refused (ended jobs', recovered ones'): written once
        there is room."""
        if self._finisher.owed_manifests:
            with contextlib.suppress(Exception):
                landed = await self._on_beat_thread(self._finisher.owed_manifests.retry)
                if landed:
                    log.info("manifests_written_late", count=landed)

    # -- watchdog and recovery --------------------------------------------------------------

    async def watchdog_forever(self) -> None:
        """The watchdog alone, for an instance that launches nothing (an API-only `serve`). With no
        heartbeats of its own, it writes the manifests its recoveries owe after each pass."""
        await self._watchdog_loop(owed_too=True)

    async def _watchdog_loop(self, *, owed_too: bool = False) -> None:
        # Half the heartbeat period: a dead instance's jobs are failed within
        # RUNNER_STALE_AFTER_SECONDS + half a heartbeat of its last beat.
        period = min(self.settings.heartbeat_seconds, self.settings.stale_after_seconds / 2) / 2
        while True:
            await asyncio.sleep(period)
            try:
                await self.watchdog_once()
            except Exception as exc:
                self._db_failed(exc)
            if owed_too:
                await self._write_owed_manifests()

    async def watchdog_once(self) -> int:
        """Fails running jobs of any instance whose heartbeat is older than the stale threshold.

        Not within RUNNER_STALE_AFTER_SECONDS of this instance seeing the database come back: while
        it was down no owner could heartbeat, so every job looks stale; the owners get one stale
        period to beat again before anything is called dead."""
        stale_after = self.settings.stale_after_seconds
        stale = await asyncio.to_thread(self.rt.jobs.stale_jobs, stale_after)
        self._db_ok()
        # Nor while the disk is full: no owner's heartbeat lands, and a failing write of ours that
        # landed first, once there is room, would fail them all.
        if self._db_down is not None or time.monotonic() - self._db_ok_since < stale_after:
            return 0
        recovered = 0
        failed: set[str] = set()
        for job in stale:
            stages = await asyncio.to_thread(ended_stages, job, self.settings)
            ok = await asyncio.to_thread(
                self.rt.jobs.fail_stale,
                job["id"],
                # The write holds only if the owner has still not heartbeated.
                stale_after,
                event_type=EventType.HEARTBEAT_STALE_RECOVERED,
                message=f"no heartbeat from {job['runner_id']} for {self.settings.stale_after_seconds} s",
                meta={"runner_id": job["runner_id"], "recovered_by": self.runner_id},
                values={
                    "error_code": ErrorCode.HEARTBEAT_STALE,
                    "error_message": recovered_message(
                        "the runner instance running this job stopped heartbeating", job, stages
                    ),
                    # Dropping the lease fences the old owner: its next write finds nothing.
                    "lease_token": None,
                    **({"stages": stages} if stages else {}),
                },
            )
            if ok:
                await self._record_recovery(job, ErrorCode.HEARTBEAT_STALE, stages)
                log.warning("heartbeat_stale_recovered", job_id=job["id"], runner_id=job["runner_id"])
                log_terminal(job, "failed")
                failed.add(job["id"])
            recovered += int(ok)
        if failed:
            # No process of a job outlives its terminal status (SPEC §3): those on this host go now.
            # The owner may be an instance that died here under another RUNNER_ID (the default id
            # is new at every start, so no start-up recovery of its will ever find them), or one
            # that is frozen and would stop them once it runs again. Found by RUNNER_JOB_ID, which
            # the job's processes and its git commands carry; another host's are not seen here.
            await asyncio.to_thread(kill_job_processes, failed, timeout=KILL_SCAN_SECONDS)
            # Then the cleanup their runs never did, for those whose run folder is on this host:
            # an in_place repo left on the job's branch would refuse the next job on it. Not this
            # instance's own runs (frozen past the stale time): fenced, they clean up themselves.
            for job_id in failed - self.active.keys():
                if not (self.settings.runs_dir / job_id / MANIFEST_NAME).exists():
                    continue
                try:
                    row = await asyncio.to_thread(self.rt.jobs.get_row, job_id)
                except Exception as exc:  # the next in_place job cleans up after it (`JobRun`)
                    log.warning("watchdog_cleanup_skipped", job_id=job_id, error_type=type(exc).__name__)
                    continue
                if row is not None:
                    # A busy repo lock (a job preparing) is not waited for: that job, or the next
                    # in_place one, does this cleanup itself (`JobRun._reclaim_in_place`).
                    await asyncio.to_thread(
                        clean_up_ended_job,
                        row,
                        self.rt.catalog,
                        self.settings,
                        lock_wait=WATCHDOG_LOCK_WAIT_SECONDS,
                    )
        return recovered

    async def recover_own_jobs(self) -> int:
        """At start-up, before claiming: kill the processes an earlier life of this `RUNNER_ID` left
        behind, then fail its jobs (`recovered_after_crash`).

        Recorded groups are killed only when the leader's pid and start time still match (never a
        recycled pid). Then /proc is scanned for `RUNNER_JOB_ID` in environments: that finds a job
        whose pid was not recorded yet when the runner died, processes that left their group, and
        processes of jobs that another instance's watchdog already failed while we were down."""
        jobs = await asyncio.to_thread(self.rt.jobs.active_jobs_of_runner, self.runner_id)
        for job in jobs:
            if job["pgid"] and job["pid"] and job["proc_start_time"]:
                killed = await asyncio.to_thread(
                    kill_process_group,
                    job["pgid"],
                    leader_pid=job["pid"],
                    leader_start_time=job["proc_start_time"],
                    grace=0.0,
                )
                if killed:
                    log.warning("killed_leftover_group", job_id=job["id"], pgid=job["pgid"])
        await asyncio.to_thread(self._kill_leftovers_by_env, {job["id"] for job in jobs})
        recovered = 0
        for job in jobs:
            stages = await asyncio.to_thread(ended_stages, job, self.settings)
            ok = await asyncio.to_thread(
                self.rt.jobs.transition,
                job["id"],
                list(RUNNING_LIKE),
                Status.FAILED,
                event_type=EventType.RECOVERED_AFTER_CRASH,
                message=f"{self.runner_id} restarted while the job ran",
                values={
                    "error_code": ErrorCode.RECOVERED_AFTER_CRASH,
                    "error_message": recovered_message(
                        "the runner restarted while this job ran", job, stages
                    ),
                    "lease_token": None,
                    **({"stages": stages} if stages else {}),
                },
                runner_id=self.runner_id,
            )
            if ok:
                await self._record_recovery(job, ErrorCode.RECOVERED_AFTER_CRASH, stages)
                log_terminal(job, "failed")
            recovered += int(ok)
        if recovered:
            log.warning("recovered_after_crash", runner_id=self.runner_id, jobs=recovered)
        for job in jobs:
            await asyncio.to_thread(clean_up_ended_job, job, self.rt.catalog, self.settings)
        # Jobs another instance's watchdog failed while this id was down (their processes went
        # with the scan above): a watchdog cleans up only a run folder on its own disk.
        await asyncio.to_thread(
            clean_up_jobs_failed_elsewhere,
            self.rt.jobs,
            self.runner_id,
            self.rt.catalog,
            self.settings,
            owed=self._finisher.owed_manifests,
        )
        return recovered

    def _kill_leftovers_by_env(self, own_active: set[str]) -> None:
        found = find_job_processes()
        ours = set(found) & own_active
        for job_id in set(found) - own_active:
            # A job another instance runs on this host is not ours; nor is one of another database.
            row = self.rt.jobs.get_row(job_id)
            if row is not None and row["runner_id"] == self.runner_id:
                ours.add(job_id)
        if ours:
            log.warning("killing_leftover_processes", job_ids=sorted(ours))
            kill_job_processes(ours, timeout=KILL_SCAN_SECONDS)


class _ClaimAlong:
    """The launcher's `ClaimHook`: a batch of terminal writes claims, in its own transaction, the
    jobs that take the slots it frees (one transaction per finished batch instead of two). It holds
    the claim turn meanwhile; nothing is claimed once the launcher stops."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self._request: ClaimRequest | None = None

    def holding(self) -> int:
        return len(self.launcher.active)

    async def begin(self, ending: list[str]) -> ClaimRequest | None:
        la = self.launcher
        await la._claim_turn.acquire()
        slots = la.settings.max_concurrency - len(la.active.keys() - set(ending))
        self._request = None
        if slots > 0 and not la._stopping:
            self._request = ClaimRequest(la.runner_id, slots, la.settings.max_jobs_per_user)
        return self._request

    def end(self, ending: list[str], claimed: list[ClaimedJob], error: BaseException | None) -> None:
        try:
            # Their processes are gone and their terminal writes made (or given up): they take
            # no slot, need no heartbeat and no cancel any more, though their tasks end a moment
            # later.
            for job_id in ending:
                self.launcher.active.pop(job_id, None)
            if self._request is not None and error is not None:
                self.launcher._claim_failed(error)
            elif self._request is not None:
                self.launcher._claimed(claimed)
        finally:
            self._request = None
            self.launcher._claim_turn.release()


class _PatientJobStore(JobStore):
    """The store JobRun writes through. An owner write (one that names its lease) that fails
    because the database is unavailable is tried again until it lands, finds the lease gone (the
    compare-and-set answers False), or the launcher gives up at a forced exit. So a job that
    finishes during an outage still gets its terminal status once the database is back, instead of
    staying `running` until a watchdog calls it stale."""

    def __init__(
        self,
        inner: JobStore,
        keep_trying: Callable[[], bool],
        known: Callable[[], set[str]] = set,
    ) -> None:
        # The same engine and the same listener list (not a copy): listeners added later count too.
        self.__dict__.update(inner.__dict__)
        self._keep_trying = keep_trying
        self._known = known

    def transition(self, *args: Any, **kwargs: Any) -> bool:
        call = functools.partial(super().transition, *args, **kwargs)
        return self._patiently(call) if kwargs.get("lease_token") is not None else call()

    def update_fields(self, *args: Any, **kwargs: Any) -> bool:
        return self._patiently(functools.partial(super().update_fields, *args, **kwargs))

    def status_of(self, *args: Any, **kwargs: Any) -> dict[str, str]:
        return self._patiently(functools.partial(super().status_of, *args, **kwargs))

    def finish_many(
        self, writes: Sequence[OwnerWrite], claim: ClaimRequest | None = None
    ) -> tuple[list[int | None], list[ClaimedJob]]:
        if claim is None:
            return self._patiently(functools.partial(super().finish_many, writes, None))
        try:
            return self._patiently(functools.partial(super().finish_many, writes, claim), lost=True)
        except CommitOutcomeUnknown:
            pass
        # The COMMIT's answer was lost: its claim may have been applied. Run again, it would claim
        # more jobs on top (docs/crash-safety.md); so the writes go again alone (their
        # compare-and-sets tell an applied write by its lease), and the jobs the lost COMMIT did
        # claim — running under this instance, and known to none of its tasks — are started.
        held, _ = self._patiently(functools.partial(super().finish_many, writes, None))
        return held, self._adopt(claim.runner_id, {w.job_id for w in writes})

    def claim(
        self, runner_id: str, *, slots: int, max_jobs_per_user: int, scan: int | None = None
    ) -> list[ClaimedJob]:
        """A claim that fails is tried again on the claim loop's next turn, except one whose
        COMMIT's answer was lost: run again it would claim more on top, and the jobs the lost
        COMMIT did claim would run nowhere until a watchdog failed them. Those are adopted."""
        try:
            return super().claim(runner_id, slots=slots, max_jobs_per_user=max_jobs_per_user, scan=scan)
        except CommitOutcomeUnknown:
            return self._adopt(runner_id, set())

    def _adopt(self, runner_id: str, ending: set[str]) -> list[ClaimedJob]:
        """The jobs a claim whose COMMIT's answer was lost did claim: `running` under this
        instance's id and known to none of its tasks (nor among the `ending` ones)."""
        mine = self._known() | ending
        adopted = [
            ClaimedJob(row["id"], row["lease_token"], row)
            for row in self._patiently(functools.partial(self.active_jobs_of_runner, runner_id))
            if row["id"] not in mine and row["status"] == Status.RUNNING.value and row["lease_token"]
        ]
        if adopted:
            log.warning("claim_after_lost_commit_adopted", job_ids=[job.id for job in adopted])
        return adopted

    def _patiently(self, call: Callable[[], T], *, lost: bool = False) -> T:
        """`call` until it lands. With `lost`, a COMMIT whose answer was lost is the caller's to
        handle (`CommitOutcomeUnknown` raised), not tried again."""
        delay = PATIENT_FIRST_DELAY
        while True:
            try:
                return call()
            except StoreUnavailable as exc:
                if lost and isinstance(exc, CommitOutcomeUnknown):
                    raise
                if not self._keep_trying():
                    raise
                log.warning("owner_write_waiting_for_database", retry_in=delay)
                time.sleep(delay)
                delay = min(delay * 2, PATIENT_MAX_DELAY)


# -- processes found by environment ---------------------------------------------------------------


def _kill_escaped(job_ids: Collection[str]) -> int:
    found = find_job_processes(job_ids)
    if not found:
        return 0
    log.warning("killing_escaped_processes", job_ids=sorted(found), processes=sum(map(len, found.values())))
    return kill_job_processes(found, timeout=KILL_SCAN_SECONDS)


def _kill_live_groups(runs: Iterable[JobRun]) -> None:
    """SIGKILLs the process group of each run whose leader is not reaped yet (its supervision not
    over): once it is, the group is empty and its pgid may already be someone else's."""
    for run in runs:
        if run.proc is not None and not run.proc.ended.done():
            kill_group(run.proc.pgid, run.proc.pid)


# -- signals --------------------------------------------------------------------------------------


def exit_now(code: int) -> None:
    """The second signal: kill the children of every launcher in this process, then exit without
    the graceful path (no waiting on threads, connections or the database)."""
    for launcher in list(_LIVE):
        launcher.kill_all_now()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    # os._exit, not SystemExit: the latter waits for every thread to finish (a store call may be
    # retrying against a database that is down), which is the waiting the operator just refused.
    os._exit(code)


def guard_serve_signals(server: uvicorn.Server) -> None:
    """For `serve`, where uvicorn owns SIGTERM/SIGINT (call before `server.run()`).

    First signal: uvicorn starts its graceful exit and the launcher stops claiming at once (it would
    otherwise claim until uvicorn has drained its connections). Second signal (TERM or INT; uvicorn
    alone forces its exit only on INT, and then skips the lifespan shutdown that stops the jobs):
    every job's process group is killed and the process exits with 128 + signal."""
    original = server.handle_exit

    def handle_exit(sig: int, frame: FrameType | None) -> None:
        if server.should_exit:
            exit_now(128 + sig)
        original(sig, frame)
        for launcher in list(_LIVE):
            launcher.begin_stop()

    server.handle_exit = handle_exit  # type: ignore[method-assign]


def log_terminal(job: dict[str, Any], status_to: str) -> None:
    """SPEC §8: every terminal transition is a service log line with these fields; the owner's
    own transitions are logged by `JobRun`, recoveries here."""
    started = job.get("started_at")
    duration_ms = int((utcnow() - started).total_seconds() * 1000) if started is not None else None
    log.info(
        "job_finished",
        job_id=job["id"],
        script_key=job.get("script_key"),
        status_from=job.get("status"),
        status_to=status_to,
        duration_ms=duration_ms,
    )


async def run_worker_forever(runtime: Runtime) -> None:
    """`codex-runner worker`: the launcher without the API, stopped by SIGTERM/SIGINT; a second
    signal stops at once but still kills the children."""
    launcher = Launcher(runtime)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: int) -> None:
        if stop.is_set():
            exit_now(128 + sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await launcher.start()
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(launcher.superseded.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for waiting in waits:
        waiting.cancel()
    await launcher.stop()
    if launcher.superseded.is_set():
        raise InstanceConflict(
            f"RUNNER_ID {launcher.runner_id!r} was taken over by another process while this one was "
            "not heartbeating; stopped"
        )


__all__ = [
    "Launcher",
    "exit_now",
    "guard_serve_signals",
    "run_worker_forever",
]
