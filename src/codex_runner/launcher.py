"""The launcher: claim loop, limits, leases, heartbeats, watchdog, recovery and shutdown.

Readable top to bottom: `start()` recovers what an earlier life left behind, then runs three
loops — claim, heartbeat, watchdog — until `stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from datetime import timedelta

import structlog

from codex_runner.execution.job import JobRun, queue_wait_seconds
from codex_runner.execution.process import kill_process_group
from codex_runner.jobs import RUNNING_LIKE, ErrorCode, EventType, Status
from codex_runner.runtime import Runtime
from codex_runner.store.instances import InstanceRegistry
from codex_runner.store.records import utcnow

log = structlog.get_logger("codex_runner.launcher")


class Launcher:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.settings = runtime.settings
        self.runner_id = runtime.settings.id
        self.registry = InstanceRegistry(runtime.engine, self.runner_id)
        self.active: dict[str, JobRun] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.registry.register)
        await self.recover_own_jobs()
        self.rt.on_created.append(self._notify_created)
        self.rt.on_cancel.append(self._notify_cancel)
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="claim"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._watchdog_loop(), name="watchdog"),
        ]
        log.info("launcher_started", runner_id=self.runner_id, max_concurrency=self.settings.max_concurrency)

    async def stop(self) -> None:
        """SPEC §3 shutdown: stop claiming, give running jobs the grace to finish, then stop the
        rest and mark them failed with `runner_shutdown`."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        with contextlib.suppress(ValueError):
            self.rt.on_created.remove(self._notify_created)
            self.rt.on_cancel.remove(self._notify_cancel)
        for task in self._loops:
            if task.get_name() == "claim":
                task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=self.settings.kill_grace_seconds)
        for run in list(self.active.values()):
            run.request_stop("shutdown")
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=self.settings.kill_grace_seconds + 5)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.registry.stopped)
        log.info("launcher_stopped", runner_id=self.runner_id)

    def kill_all_now(self) -> None:
        """Second signal: no grace, but no orphan either."""
        for run in self.active.values():
            if run.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    import os

                    os.killpg(run.proc.pgid, signal.SIGKILL)

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

    # -- claim ------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        poll = self.settings.poll_interval_seconds
        while not self._stopping:
            self._wake.clear()
            slots = self.settings.max_concurrency - len(self.active)
            claimed = []
            if slots > 0:
                try:
                    claimed = await asyncio.to_thread(
                        self.rt.jobs.claim,
                        self.runner_id,
                        slots=slots,
                        max_jobs_per_user=self.settings.max_jobs_per_user,
                    )
                except Exception as exc:
                    log.warning("claim_failed", error_type=type(exc).__name__)
            for job in claimed:
                self.rt.metrics.queue_wait.observe(queue_wait_seconds(job.row))
                run = JobRun(self.rt, job)
                self.active[job.id] = run
                task = asyncio.create_task(run.run(), name=f"job-{job.id}")
                self._tasks[job.id] = task
                task.add_done_callback(functools.partial(self._job_done, job.id))
            if claimed and len(claimed) == slots:
                continue  # more may be waiting; a finishing job will wake us
            await self._poll_cancels()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=poll)

    def _job_done(self, job_id: str, _task: object = None) -> None:
        self.active.pop(job_id, None)
        self._tasks.pop(job_id, None)
        self._wake.set()

    async def _poll_cancels(self) -> None:
        """Cancels requested through another instance reach us here, within one poll."""
        if not self.active:
            return
        try:
            statuses = await asyncio.to_thread(self.rt.jobs.status_of, list(self.active))
        except Exception:
            return
        for job_id, status in statuses.items():
            if status == Status.CANCEL_REQUESTED:
                self._cancel_local(job_id)

    # -- heartbeats -------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            await self.heartbeat_once()

    async def heartbeat_once(self) -> None:
        leases = {job_id: run.lease for job_id, run in self.active.items() if not run.fenced}
        try:
            await asyncio.to_thread(self.registry.heartbeat)
            alive = await asyncio.to_thread(self.rt.jobs.heartbeat, self.runner_id, leases)
        except Exception as exc:
            # The processes keep running; the next beat tries again (issue 6: nothing is lost).
            log.warning("heartbeat_failed", error_type=type(exc).__name__)
            return
        for job_id, run in list(self.active.items()):
            if job_id not in leases:
                continue
            if job_id not in alive:
                log.warning("lease_lost", job_id=job_id)
                run.request_stop("lease_lost")
            elif alive[job_id] == Status.CANCEL_REQUESTED:
                run.request_stop("cancel")
            else:
                run.heartbeat_files()

    # -- watchdog and recovery --------------------------------------------------------------

    async def _watchdog_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self.settings.heartbeat_seconds, self.settings.stale_after_seconds / 2))
            with contextlib.suppress(Exception):
                await self.watchdog_once()

    async def watchdog_once(self) -> int:
        """Fails running jobs of any instance whose heartbeat is older than the stale threshold."""
        threshold = utcnow() - timedelta(seconds=self.settings.stale_after_seconds)
        stale = await asyncio.to_thread(self.rt.jobs.stale_jobs, threshold)
        recovered = 0
        for job in stale:
            ok = await asyncio.to_thread(
                self.rt.jobs.transition,
                job["id"],
                list(RUNNING_LIKE),
                Status.FAILED,
                event_type=EventType.HEARTBEAT_STALE_RECOVERED,
                message=f"no heartbeat from {job['runner_id']} for {self.settings.stale_after_seconds} s",
                meta={"runner_id": job["runner_id"], "recovered_by": self.runner_id},
                values={
                    "error_code": ErrorCode.HEARTBEAT_STALE,
                    "error_message": "the runner instance running this job stopped heartbeating",
                    # Dropping the lease fences the old owner: its next write finds nothing.
                    "lease_token": None,
                },
                heartbeat_before=threshold,
            )
            recovered += int(ok)
        return recovered

    async def recover_own_jobs(self) -> int:
        """At start-up: kill the process groups an earlier life of this `RUNNER_ID` left behind,
        then fail those jobs (`recovered_after_crash`)."""
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
        recovered = 0
        for job in jobs:
            ok = await asyncio.to_thread(
                self.rt.jobs.transition,
                job["id"],
                list(RUNNING_LIKE),
                Status.FAILED,
                event_type=EventType.RECOVERED_AFTER_CRASH,
                message=f"{self.runner_id} restarted while the job ran",
                values={
                    "error_code": ErrorCode.RECOVERED_AFTER_CRASH,
                    "error_message": "the runner restarted while this job ran",
                    "lease_token": None,
                },
                runner_id=self.runner_id,
            )
            recovered += int(ok)
        if recovered:
            log.warning("recovered_after_crash", runner_id=self.runner_id, jobs=recovered)
        return recovered


async def run_worker_forever(runtime: Runtime) -> None:
    """`codex-runner worker`: the launcher without the API, stopped by SIGTERM/SIGINT; a second
    signal stops at once but still kills the children."""
    launcher = Launcher(runtime)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            stop.set()
        else:
            launcher.kill_all_now()
            raise SystemExit(130)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await launcher.start()
    await stop.wait()
    await launcher.stop()


__all__ = ["Launcher", "run_worker_forever"]
