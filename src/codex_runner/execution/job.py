"""One job's life on the instance that claimed it: prepare → script → commit → push → cleanup,
with every write fenced by the job's lease.

Blocking work (file system, database, git) runs in worker threads, and a job makes as few of those
trips as it can (a job makes three: set-up and prepare, cleanup, and the end, which it shares with
the other jobs ending meanwhile, see `finisher.py`): a stage change marks the run manifest dirty,
and the job's next trip writes it before its own work, so the manifest still changes at every stage
change, in order, before anything that follows. A running script's next trip comes at the latest
`PID_RECORD_DELAY_SECONDS` after its spawn.

A `scratch` job without a credential makes only the shared one: its set-up (one folder) and, when
the script left its folder empty, its cleanup (one `rmdir`) run on the event loop, as the log's own
writes do. They are a handful of small file operations, cheaper than the trip: handing work to a
thread and back makes the GIL change hands dozens of times, and in drains of trivial jobs the
server spent 15–35% less CPU per job without those two trips (docs/performance.md, "Dispatch").
Its log file is made right after the spawn, in the same turn of the loop, so before any output is
read (the runner's lines of the set-up wait in memory until then), and its stage changes wait for
its next trip like any other job's: the pid record of a script still running after
`PID_RECORD_DELAY_SECONDS`, else the terminal write. So the spawn waits for no file but the folder,
and a trivial job writes its manifest once (each write is a new file on the disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog

from codex_runner.catalog import RepoSpec, ScriptSpec
from codex_runner.errors import CryptoError, NotFound, RepoNotAllowed
from codex_runner.execution.agents import (
    apply_risk_policy,
    codex_home_for,
    codex_sandboxes_commands,
    is_codex_exec,
    keep_secret_variables_from_commands,
    with_permission_profile,
)
from codex_runner.execution.codex_events import CodexEventParser
from codex_runner.execution.failure import script_failure_message
from codex_runner.execution.finisher import Ending, GroupCommitter, Outcome
from codex_runner.execution.git import GIT_STAGE, JOB_OF_GIT
from codex_runner.execution.manifest import ManifestWriter
from codex_runner.execution.process import JobProcess, ProcessOutcome, ProcessSpec, SpawnFailed, build_env
from codex_runner.execution.procscan import find_job_processes, kill_job_processes, stop_job_processes
from codex_runner.execution.recovery import clean_up_ended_job, in_place_job_prefix, mark_cleaned_up
from codex_runner.execution.sandbox import READ_ONLY, ConfinementFailed, JobAccess, job_access
from codex_runner.execution.workspace import (
    GitCredential,
    GitError,
    Workspace,
    cleanup_workspace,
    commit_changes,
    prepare_workspace,
    push_branch,
    remove_empty_scratch,
    workspace_record,
)
from codex_runner.jobs import TERMINAL, ErrorCode, Status
from codex_runner.logs.redaction import REDACTION_VERSION, RULESETS
from codex_runner.logs.writer import LogWriter
from codex_runner.runtime import Runtime
from codex_runner.secrets import Masker, is_secret_variable, utf8_tail
from codex_runner.store.jobs import Cas, ClaimedJob, OwnerWrite
from codex_runner.store.records import initial_stages, iso, utcnow

log = structlog.get_logger("codex_runner.job")

#: How long the kill of a job's escaped processes (`JobRun._stop_escaped`) tries again before
#: the commit stage goes on: a process may fork between a scan and its kill.
ESCAPED_KILL_SECONDS = 2.0
T = TypeVar("T")

TAIL_BYTES = 8192
#: A script still running this long after spawn gets its pid, pgid and start time recorded; one
#: that ends sooner has them written with its terminal status instead (a write transaction and a
#: thread trip less per short job). Until then crash recovery finds its processes by their
#: `RUNNER_JOB_ID` (docs/crash-safety.md).
PID_RECORD_DELAY_SECONDS = 1.0


class JobRun:
    """Runs one claimed job. `request_stop(reason)` asks it to stop: "cancel", "shutdown" or
    "lease_lost" (then it writes nothing more to the job)."""

    def __init__(self, runtime: Runtime, claimed: ClaimedJob, finisher: GroupCommitter | None = None) -> None:
        self.rt = runtime
        # The launcher's, shared by its jobs so that their terminal writes commit together.
        self.finisher = finisher or GroupCommitter(runtime.jobs)
        self.settings = runtime.settings
        self.job_id = claimed.id
        self.lease = claimed.lease_token
        self.row = claimed.row
        self.stop_reason: str | None = None
        # Resolved by `request_stop` while the script runs (a future, not an Event: waiting on it
        # needs no task of its own).
        self._stop: asyncio.Future[None] | None = None
        self.stages: dict[str, dict[str, Any]] = {s["name"]: s for s in initial_stages()}
        self.run_dir = self.settings.runs_dir / self.job_id
        self.manifest = ManifestWriter(self.run_dir)
        self.log: LogWriter | None = None
        # Runner lines written before the log file exists (a scratch job's set-up: `_open_log`).
        self._early_lines: list[str] | None = None
        # The job's known secret values, found once with its credential; the log writer and every
        # error message mask the same set.
        self.secrets: list[str] = list(self.settings.secret_values())
        self.proc: JobProcess | None = None
        self._log_errors = 0
        self.started = time.monotonic()
        self._spawn_error = "spawn failed"
        self.agent: CodexEventParser | None = None
        # A stage changed since the manifest was last written: the next thread trip writes it.
        self._manifest_dirty = False
        # The process ids are not in the job row yet: the terminal write carries them.
        self._process_unrecorded = False
        # The prepared workspace (and its repo) until `_cleanup` has run: a run that fails on
        # the way still cleans it up (`_settle_after_error`).
        self._workspace: tuple[Workspace, RepoSpec] | None = None
        self._workspace_record: dict[str, Any] | None = None
        self._cleaned = False
        # `_redact`'s masker, for the list of secrets it was made from.
        self._masker: tuple[list[str], Masker] | None = None
        # (expected status, manifest extras, prepared manifest file) between `_end_before` and
        # `_end_after`.
        self._ending: tuple[str, dict[str, Any], str | None] = ("", {}, None)

    # -- control ----------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)

    @property
    def fenced(self) -> bool:
        return self.stop_reason == "lease_lost"

    #: True while the job's git runs for its prepare, commit or push stage (a worker thread): a cancel
    #: may kill that git after the grace (`Launcher._kill_git_after_grace`); never its cleanup's,
    #: which must put an in_place repo back on its branch.
    git_killable = False

    @contextlib.contextmanager
    def _killable_git(self, stage: str) -> Iterator[None]:
        """The git of `stage` (prepare, commit, push), which a cancel may kill: the flag the
        launcher reads, and `RUNNER_GIT_STAGE` on the processes (the context a worker thread
        copies), so that the kill finds them and never the cleanup's git."""
        token = GIT_STAGE.set(stage)
        self.git_killable = True
        try:
            yield
        finally:
            self.git_killable = False
            GIT_STAGE.reset(token)

    @property
    def in_git_stage(self) -> bool:
        """Not in its script: preparing, committing or pushing (git in a worker thread, which a
        stop request does not reach; the shutdown kills those git processes instead)."""
        return self.proc is None or self.proc.returncode is not None

    def _shutdown_code(self, code: str, message: str) -> tuple[str, str]:
        """A stage that failed once the runner began to shut down failed because of it (its git
        was killed): SPEC §3 marks such jobs `runner_shutdown`."""
        if self.stop_reason == "shutdown":
            return ErrorCode.RUNNER_SHUTDOWN, f"the runner shut down ({message})"
        return code, message

    # -- bookkeeping ------------------------------------------------------------------------

    def _stage(
        self, name: str, status: str, *, exit_code: int | None = None, error: str | None = None
    ) -> None:
        stage = self.stages[name]
        now = iso(utcnow())
        if status == "running":
            stage["started_at"] = now
        elif status in {"success", "failed", "skipped", "canceled", "timeout"}:
            stage["finished_at"] = now
            if stage["started_at"] is None and status != "skipped":
                stage["started_at"] = now
        stage["status"] = status
        if exit_code is not None:
            stage["exit_code"] = exit_code
        if error is not None:
            # Redacted whole, then cut: a secret at the cut is never half shown.
            # NUL as U+FFFD, as everywhere text of the job's reaches the row (docs/execution.md).
            stage["error"] = utf8_tail(self._redact(error.replace("\0", "\ufffd")), TAIL_BYTES)
        self._manifest_dirty = True

    def _manifest_doc(self, status: str | None = None, extra: dict | None = None) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": status or "running",
            "repo": self.row["repo"],
            "script_key": self.row["script_key"],
            "runner_id": self.settings.id,
            "attempt": self.row["attempt"],
            "stages": list(self.stages.values()),
            "pid": self.proc.pid if self.proc else None,
            "pgid": self.proc.pgid if self.proc else None,
            "updated_at": iso(utcnow()),
            **({"workspace": self._workspace_record} if self._workspace_record else {}),
            **(extra or {}),
        }

    def _write_manifest(self, doc: dict[str, Any], *, force: bool = True, durable: bool = False) -> bool:
        """Stage changes and the periodic refresh are atomic but not fsynced; the terminal write
        (`durable=True`) is fsynced too. Blocks on the file system: worker threads only, except the
        throttled periodic refresh. False when the disk refused it. Nothing once fenced (True: none
        owed): the job ended in another instance's hands, which may have written its status here
        already (`record_recovery`); see `_fenced_manifest`."""
        if self.fenced:
            return True
        try:
            self.manifest.update(doc, force=force, durable=durable)
        except OSError as exc:
            log.warning("manifest_write_failed", job_id=self.job_id, error=exc.strerror)
            return False
        return True

    def _take_dirty_manifest(self) -> dict[str, Any] | None:
        """The document to write on the next thread trip, built now (on the event loop, where the
        stages change), or None when nothing changed since the last write."""
        if not self._manifest_dirty:
            return None
        self._manifest_dirty = False
        return self._manifest_doc()

    def _write_then(self, doc: dict[str, Any] | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if doc is not None:
            self._write_manifest(doc)
        return fn(*args, **kwargs)

    async def _in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in a worker thread, after writing the manifest if a stage changed:
        one trip for both, in that order."""
        return await asyncio.to_thread(self._write_then, self._take_dirty_manifest(), fn, *args, **kwargs)

    async def _flush_manifest(self) -> None:
        doc = self._take_dirty_manifest()
        if doc is not None:
            await asyncio.to_thread(self._write_manifest, doc)

    def heartbeat_files(self) -> None:
        with contextlib.suppress(OSError):
            self.manifest.touch_heartbeat()
        self._write_manifest(self._manifest_doc(), force=False)

    def _runner_line(self, text: str, *, output_follows: bool = False) -> None:
        if self.log is not None:
            try:
                self.log.runner_line(text, output_follows=output_follows)
            except OSError as exc:
                # A full or failing log disk costs the line, not the job (docs/failure-modes.md),
                # as a chunk of the script's output that cannot be written does.
                self._log_errors += 1
                if self._log_errors == 1:
                    log.warning("job_log_write_failed", job_id=self.job_id, error=exc.strerror or str(exc))
        elif self._early_lines is not None:
            self._early_lines.append(text)

    def _open_log(self) -> None:
        """Makes the job's log file, with the runner lines held until then; once only."""
        if self.log is not None:
            return
        self.log = LogWriter(
            self.settings.log_dir / f"{self.job_id}.log",
            max_bytes=self.settings.log_max_bytes,
            known_secrets=self.secrets,
        )
        early, self._early_lines = self._early_lines or [], None
        for text in early:
            self._runner_line(text)

    def _sink(self, data: bytes) -> None:
        if self.log is not None:
            self.log.write(data)

    async def _fenced_update(self, values: dict[str, Any]) -> None:
        if self.fenced:
            await self._flush_manifest()
            return
        ok = await self._in_thread(self.rt.jobs.update_fields, self.job_id, self.lease, values)
        if not ok and self.stop_reason is None:
            # Either our lease is gone or the job is no longer running: stop, write nothing.
            status = (await asyncio.to_thread(self.rt.jobs.status_of, [self.job_id])).get(self.job_id)
            if status != Status.CANCEL_REQUESTED:
                self.request_stop("lease_lost")

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Never raises: every failure ends as a terminal status (or, fenced, as nothing)."""
        JOB_OF_GIT.set(self.job_id)  # this task's own context: its git commands carry the job's id
        try:
            await self._run()
        except Exception as exc:  # the job must end even when the runner itself is at fault
            log.error("job_internal_error", job_id=self.job_id, error_type=type(exc).__name__)
            for name, stage in self.stages.items():
                if stage["status"] == "running":  # a terminal row shows no stage still running
                    self._stage(name, "failed", error="internal runner error")
            await self._settle_after_error()
            await self._finish(Status.FAILED, ErrorCode.INTERNAL_ERROR, "internal runner error", None)
        finally:
            with contextlib.suppress(Exception):
                if self.fenced:
                    await asyncio.to_thread(self._fenced_manifest)
                else:
                    await self._flush_manifest()  # a path that ended without a terminal write
            if self.log is not None:
                with contextlib.suppress(OSError):
                    self.log.close()

    def _fenced_manifest(self) -> None:
        """A fenced run's manifest says how the row ended (the recovery that failed the job may run
        on another host, with no manifest of ours to rewrite), not `running` for ever."""
        row = self.rt.jobs.get_row(self.job_id)
        if row is None or row["status"] not in TERMINAL:
            return
        doc = self._manifest_doc(row["status"], {"error_code": row["error_code"]})
        if isinstance(row["stages"], list):
            doc["stages"] = row["stages"]
        try:
            self.manifest.update(doc, force=True, durable=True)
        except OSError as exc:
            log.warning("manifest_write_failed", job_id=self.job_id, error=exc.strerror)
            # As a terminal manifest of its own (`_end_after`): written once there is room.
            self.finisher.owed_manifests.add(self.manifest, doc)

    async def _settle_after_error(self) -> None:
        """What a failed `_run` left behind, before the terminal status goes out: no process of
        the job outlives that status (SPEC §3), and its workspace is cleaned up as after any
        failure (an `in_place` repo back on its branch). Best effort: the status must go out."""
        proc = self.proc
        if proc is not None and not proc.ended.done():
            grace = float(self.settings.kill_grace_seconds)
            with contextlib.suppress(Exception):
                await proc.terminate("internal_error", grace)
        if self._workspace is not None and not self._cleaned:
            ws, repo = self._workspace
            with contextlib.suppress(Exception):
                await self._cleanup(ws, repo, failed=True)

    async def _run(self) -> None:
        repo = self.rt.catalog.repos.get(self.row["repo"])
        script = self.rt.catalog.scripts.get(self.row["script_key"])
        moved = _in_place_change(repo, self.row.get("workspace_mode"))
        # One trip: credential, log file, the manifest, the workspace; no trip for a scratch job
        # without a credential, and no file before its spawn but its folder (see the module's
        # docstring).
        if repo is not None and repo.workspace == "scratch" and not repo.credential:
            credential, prepared = self._set_up(repo, script, files_after_spawn=True)
        else:
            credential, prepared = await asyncio.to_thread(self._set_up, None if moved else repo, script)
        if moved:
            await self._finish(Status.FAILED, ErrorCode.PREPARE_FAILED, moved, None)
            return
        if repo is None or script is None:
            # Removed since the job was queued, or (several instances) never in this instance's
            # runner.toml: the API that accepted the job had it. Say which instance.
            missing = f"repo {self.row['repo']!r}" if repo is None else f"script {self.row['script_key']!r}"
            await self._finish(
                Status.FAILED,
                ErrorCode.PREPARE_FAILED,
                f"{missing} is not in the runner.toml of runner instance {self.settings.id!r} that "
                "took the job (removed since the job was queued, or that instance's configuration "
                "differs from the one that accepted it)",
                None,
            )
            return
        if isinstance(prepared, GitError):
            exc = prepared
            self._stage("prepare", "failed", error=exc.message)
            self._runner_line(f"prepare failed: {exc.message}")
            await self._finish(Status.FAILED, *self._shutdown_code(exc.code, exc.message), None)
            return
        assert prepared is not None
        ws = prepared
        self._workspace = (ws, repo)
        if self._workspace_record is None:
            # Made once (the workspace does not change): every manifest write carries it, for the
            # cleanup start-up recovery does after a crash.
            self._workspace_record = workspace_record(ws)
            self._manifest_dirty = True

        outcome = await self._run_script(script, repo, ws)
        if ws.git_dir is not None:
            await self._stop_escaped()
        result: dict[str, Any] | None = None
        agent_failed = self.agent is not None and self.agent.failed
        clean_exit = outcome is not None and outcome.reason is None and outcome.exit_code == 0
        if clean_exit and self.stop_reason is None and not agent_failed:
            result = await self._commit_and_push(script, repo, ws, credential)
        elif clean_exit and self.stop_reason == "shutdown" and not agent_failed and ws.branch and repo.commit:
            # The script finished, but the runner began to stop before its commit: not a success
            # without the commit and push that SPEC §3 counts in one (a cancel is settled later).
            for stage in ("commit", "push"):
                self._stage(stage, "skipped")
            result = {"error": (ErrorCode.RUNNER_SHUTDOWN, "the runner shut down before the commit")}
        await self._cleanup(ws, repo, failed=result is None or "error" in result)
        await self._conclude(outcome, result, script)

    def _set_up(
        self, repo: RepoSpec | None, script: ScriptSpec | None, *, files_after_spawn: bool = False
    ) -> tuple[GitCredential | None, Workspace | GitError | None]:
        """Worker thread (on the loop for a scratch job): the job's credential and log file, then
        (when its repo and script are still configured) the prepare stage and its workspace. A
        prepare failure is returned, not raised. The job's coroutine waits for this trip, so the
        stage may change here.

        `files_after_spawn` (a scratch job's set-up, on the loop): the log file waits for the
        spawn (`_open_log`), and the prepare stage for the job's next manifest write."""
        # No mkdir of the run and log folders here: the manifest and log writers make theirs.
        refused: GitError | None = None
        try:
            credential = self._credential(repo)
        except GitError as exc:  # the prepare fails, saying why, once the log is open
            credential, refused = None, exc
        self.secrets = self._known_secrets(script, credential)
        if files_after_spawn:
            self._early_lines = []
        else:
            self._open_log()
        self._runner_line(f"job {self.job_id} started on {self.settings.id} (attempt {self.row['attempt']})")
        if repo is None or script is None:
            return credential, None
        self._stage("prepare", "running")
        if refused is not None:
            return None, refused
        if not files_after_spawn:
            # Before a prepare that may take a while (a clone, a fetch): readers see it running.
            self._write_manifest(self._manifest_doc())
            self._manifest_dirty = False
        if repo.workspace == "in_place":
            try:
                self._reclaim_in_place(repo)
            except Exception as exc:  # the prepare then says why the repo is not free, as before
                log.warning("in_place_reclaim_failed", job_id=self.job_id, error_type=type(exc).__name__)
        try:
            with self._killable_git("prepare"):
                ws = prepare_workspace(repo, self.job_id, self.settings, credential)
        except GitError as exc:
            return credential, exc
        self._stage("prepare", "success")
        self._runner_line(f"workspace ready ({ws.mode}) at {ws.path}")
        self._stage("script", "running")
        if ws.mode != "scratch":
            # Recorded before the spawn: a crash from here on (or a watchdog's verdict) finds what
            # to clean up, and an in_place repo does not stay on the job's branch. A scratch job's
            # stages reach the manifest on its next trip (its folder is retention's to remove).
            self._workspace_record = workspace_record(ws)
            self._write_manifest(self._manifest_doc())
            self._manifest_dirty = False
        return credential, ws

    def _reclaim_in_place(self, repo: RepoSpec) -> None:
        """An in_place repo still on the branch of a job that has ended (failed by a watchdog, or by a
        restart under another RUNNER_ID, before its run could clean up) would refuse this job as
        "on the job branch": that job's cleanup runs here first. A job still active keeps the
        folder (this one then fails as before)."""
        prefix = in_place_job_prefix(repo.source)
        if prefix is None or self.job_id.lower().startswith(prefix):
            return
        rows = self.rt.jobs.rows_with_id_prefix(prefix)
        if any(Status(row["status"]) not in TERMINAL for row in rows if row["id"] != self.job_id):
            return  # a job of that prefix is active: the branch may be its own
        for row in rows:
            if row["id"] == self.job_id:
                continue
            # Failed by another host's watchdog, its agent may still run here: it goes first, and
            # a job whose processes cannot be stopped keeps the folder.
            kill_job_processes({row["id"]}, timeout=5.0)
            if find_job_processes({row["id"]}):
                log.warning("in_place_reclaim_skipped", job_id=self.job_id, ended_job=row["id"])
                continue
            log.warning("in_place_reclaimed", job_id=self.job_id, ended_job=row["id"])
            clean_up_ended_job(row, self.rt.catalog, self.settings)

    def _credential(self, repo: RepoSpec | None) -> GitCredential | None:
        """The repo's stored credential. One not stored, or that the key cannot decrypt, is the
        operator's to fix: a `GitError` naming it, not the "internal runner error" it was."""
        if repo is None or not repo.credential:
            return None
        try:
            host, username, secret = self.rt.credentials.get_secret(repo.credential)
        except NotFound:
            raise GitError(
                f"credential {repo.credential!r} not found: store it with "
                f"`codex-runner credentials set {repo.credential} --host HOST`"
            ) from None
        except CryptoError:
            # Not the store's "run `codex-runner keygen`": a new key decrypts nothing stored.
            raise GitError(
                f"credential {repo.credential!r} cannot be decrypted: RUNNER_ENCRYPTION_KEY is not set "
                "on this runner, or is not the key it was stored with"
            ) from None
        return GitCredential(host=host, username=username, secret=secret)

    def _known_secrets(self, script: ScriptSpec | None, credential: GitCredential | None) -> list[str]:
        import os

        values = list(self.settings.secret_values())
        if credential is not None:
            values.append(credential.secret)
        for name in script.env if script else ():
            value = os.environ.get(name)
            if value and is_secret_variable(name, value):
                values.append(value)
        return values

    async def _run_script(self, script: ScriptSpec, repo: RepoSpec, ws: Workspace) -> ProcessOutcome | None:
        args = self.row["args"]
        argv = script.build_argv(
            args, workspace=str(ws.path), job_id=self.job_id, repo=repo.name, branch=ws.branch or ""
        )
        extra = {"RUNNER_JOB_ID": self.job_id, "RUNNER_WORKSPACE": str(ws.path)}
        home: Path | None = None
        confine = True
        if is_codex_exec(script):
            argv = keep_secret_variables_from_commands(
                apply_risk_policy(argv, repo.risk_policy, str(ws.path))
            )
            confine = not codex_sandboxes_commands(argv)
            home = await self._in_thread(codex_home_for, self.settings)
            if home is not None:
                extra["CODEX_HOME"] = str(home)
            self.agent = CodexEventParser(redact=self._redact)
        try:
            access = self._access(ws, home if confine else None)
        except ConfinementFailed as exc:
            self._stage("script", "failed", error=exc.message)
            self._runner_line(f"spawn failed: {exc.message}")
            self._spawn_error = exc.message
            return None
        if access is not None and not confine:
            # codex's own sandbox (bubblewrap) cannot run under the runner's Landlock: the
            # runner's files are kept from the model's commands by codex's permission profile.
            workspace, readable = access.granted[0][0], [path for path, _ in access.granted[1:]]
            argv = with_permission_profile(argv, workspace, access.hidden, readable)
        spec = ProcessSpec(
            argv=argv,
            cwd=ws.path,
            env=build_env(script.env, extra),
            access=access if confine else None,
            isolation=self.settings.job_isolation,
            max_processes=self.settings.job_max_processes,
            stdin=script.build_stdin(
                args, workspace=str(ws.path), job_id=self.job_id, repo=repo.name, branch=ws.branch or ""
            ),
        )
        if self.stop_reason is None and time.monotonic() - self.started > self._lease_check_after():
            # A prepare that outlasted a heartbeat interval may have outlasted the lease too (the
            # instance frozen meanwhile, and another one's watchdog failed the job): a fenced write
            # first, so that a job whose row says `failed` does not start its script.
            await self._fenced_update({"stages": list(self.stages.values())})
        if self.stop_reason is not None:
            self._stage("script", "canceled")
            return ProcessOutcome(
                exit_code=0, signal=None, stderr_tail=b"", reason=self.stop_reason, duration_ms=0
            )
        try:
            # codex's events come on stdout only: its stderr (tracing) must not split their lines.
            tap = self.agent.feed if self.agent is not None else None
            self.proc = await JobProcess.start(spec, self._sink, stdout_tap=tap)
        except SpawnFailed as exc:
            self._stage("script", "failed", error=exc.message)
            self._runner_line(f"spawn failed: {exc.message}")
            self._spawn_error = exc.message
            return None
        try:
            self._open_log()  # before the loop runs again, so before any output is read
        except OSError:
            # No log, no run: the job fails (`run`), and its processes must not outlive it.
            await self.proc.terminate("internal_error", 0.0)
            raise
        self._process_unrecorded = True
        outcome = await self._supervise(self.proc, self.row["timeout_seconds"])
        tail = outcome.stderr_tail.decode("utf-8", "replace")
        if outcome.reason == "timeout":
            self._stage("script", "timeout", exit_code=outcome.exit_code, error=tail or None)
        elif outcome.reason is not None:
            self._stage("script", "canceled", exit_code=outcome.exit_code)
        elif outcome.exit_code == 0:
            self._stage("script", "success", exit_code=0)
        else:
            self._stage("script", "failed", exit_code=outcome.exit_code, error=tail)
        self._runner_line(
            f"script exited with code {outcome.exit_code}"
            + (f" ({outcome.reason})" if outcome.reason else "")
        )
        return outcome

    def _lease_check_after(self) -> float:
        """Seconds after the claim past which the spawn checks the lease first (`_run_script`)."""
        return float(min(self.settings.heartbeat_seconds, self.settings.stale_after_seconds))

    def _access(self, ws: Workspace, codex_home: Path | None) -> JobAccess | None:
        """What the job's processes may reach: not the runner's files, but its workspace, the
        repository its worktree belongs to (a clone's borrowed objects, read-only) and a codex
        job's codex home."""
        if self.settings.job_isolation == "off":
            return None
        store_rights = 0 if ws.mode == "worktree" else READ_ONLY
        store = ws.store if ws.mode in ("worktree", "clone") else None
        return job_access(
            self.settings,
            ws.path,
            store=store,
            store_rights=store_rights,
            codex_home=codex_home,
            job_id=self.job_id,
        )

    async def _stop_escaped(self) -> None:
        """Kills what the script started that left its process group (a daemon: setsid), before the
        runner's own git works in the workspace. The group is gone, but such a process ran on
        until after the job ended (the launcher's sweep): it could change `.git` once
        `commit_changes` had checked it, a COMMIT_EDITMSG made a link to any file the runner can
        write, which the commit then wrote over, or write into an in_place repo during and
        after its cleanup. Found by `RUNNER_JOB_ID` in its environment: one look through /proc,
        for jobs with a git workspace only (the runner's git of this job runs only later)."""
        killed = await asyncio.to_thread(kill_job_processes, {self.job_id}, timeout=ESCAPED_KILL_SECONDS)
        if killed:
            self._runner_line(f"stopped {killed} process(es) the script left running outside its group")

    async def _supervise(self, proc: JobProcess, timeout: int) -> ProcessOutcome:
        # Plain futures, no task per wait: `asyncio.wait` never cancels what it waits on.
        ended = proc.ended
        self._stop = stop = asyncio.get_running_loop().create_future()
        if self.stop_reason is not None:
            stop.set_result(None)
        deadline = time.monotonic() + timeout
        done, _ = await asyncio.wait(
            {ended, stop}, timeout=min(timeout, PID_RECORD_DELAY_SECONDS), return_when=asyncio.FIRST_COMPLETED
        )
        record: asyncio.Task[None] | None = None
        if not done:
            # A task of its own: during a database outage the write waits for the database, and
            # the deadline, a cancel or a shutdown must still be acted on meanwhile.
            record = asyncio.create_task(self._record_process(), name=f"pid-record-{self.job_id}")
            done, _ = await asyncio.wait(
                {ended, stop},
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        try:
            if ended not in done:
                reason = self.stop_reason if stop in done and self.stop_reason else "timeout"
                self._runner_line(f"stopping the process group ({reason})", output_follows=True)
                await self._stop_processes(proc, reason)
            return await proc.wait()
        finally:
            if record is not None:
                await self._settle_record(record)

    async def _stop_processes(self, proc: JobProcess, reason: str) -> None:
        """The group's SIGTERM, grace and SIGKILL, and the same, at the same time, for the job's
        processes that are not in its group (found by RUNNER_JOB_ID in their environment): codex
        without a sandbox runs each command the model asks for in a group of its own, and those
        outlived the job's terminal status until the launcher's next sweep."""
        grace = float(self.settings.kill_grace_seconds)
        outside = asyncio.ensure_future(
            asyncio.to_thread(stop_job_processes, {self.job_id}, grace=grace, group=proc.pgid)
        )
        try:
            await proc.terminate(reason, grace)
        finally:
            try:
                await outside
            except Exception as exc:  # the launcher's sweep after the job ends looks again
                log.warning("job_process_scan_failed", job_id=self.job_id, error_type=type(exc).__name__)

    async def _settle_record(self, record: asyncio.Task[None]) -> None:
        """The pid record once the script is over: still waiting (the database is down), it is
        dropped; failed, it is logged. Either way the terminal write carries the ids instead."""
        if not record.done():
            record.cancel()
        try:
            await record
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this job's own task is being cancelled, not only the record
            self._process_unrecorded = True
        except Exception as exc:
            log.warning("pid_record_failed", job_id=self.job_id, error_type=type(exc).__name__)
            self._process_unrecorded = True

    async def _record_process(self) -> None:
        """The pid record of a script that runs on (`PID_RECORD_DELAY_SECONDS`); a fenced write."""
        values = self._unrecorded_process_values()
        self._process_unrecorded = False
        await self._fenced_update({**values, "stages": list(self.stages.values())})

    def _unrecorded_process_values(self) -> dict[str, int]:
        """The process ids if the job row lacks them; built when asked, not at spawn (see
        `JobProcess.start_time`)."""
        if self.proc is None or not self._process_unrecorded:
            return {}
        return {"pid": self.proc.pid, "pgid": self.proc.pgid, "proc_start_time": self.proc.start_time}

    def _redact(self, text: str) -> str:
        """Text bound for the job row, its events or its manifest (a stage's error, the error
        message): the job's known secret values masked, then the published redaction rules
        applied, as log pages apply them (SPEC §5: no secret in an error or an event)."""
        if self._masker is None or self._masker[0] is not self.secrets:
            # Once per set of secrets (found at set-up), not per text: a codex summary has hundreds.
            self._masker = (self.secrets, Masker(self.secrets))
        masked = self._masker[1](text)
        return RULESETS[REDACTION_VERSION].redact(masked.encode("utf-8", "replace"))[0].decode("utf-8")

    def _redact_all(self, value: Any) -> Any:
        """`_redact` on every string of JSON-like data."""
        if isinstance(value, str):
            return self._redact(value)
        if isinstance(value, dict):
            return {key: self._redact_all(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self._redact_all(item) for item in value]
        return value

    async def _commit_and_push(
        self, script: ScriptSpec, repo: RepoSpec, ws: Workspace, credential: GitCredential | None
    ) -> dict[str, Any]:
        result: dict[str, Any] = {
            "branch": ws.branch,
            "base_branch": ws.base_branch,
            "commit": None,
            "pushed": False,
            "files_changed": 0,
            "lines_added": 0,
            "lines_removed": 0,
        }
        if ws.branch is None or not repo.commit:
            self._stage("commit", "skipped")
            self._stage("push", "skipped")
            return result
        self._stage("commit", "running")
        # A fenced write first: an instance frozen past the stale time may find, once it runs
        # again, that another one recovered the job while its script ended. Its commit must not
        # land then (SPEC §3: a lost lease writes nothing), and waiting for the next heartbeat to
        # tell it is a race with the commit. One write per committing job; none for scratch jobs.
        await self._fenced_update({"stages": list(self.stages.values())})
        if self.fenced:
            return result
        try:
            with self._killable_git("commit"):
                commit = await self._in_thread(
                    commit_changes,
                    ws,
                    message=f"{script.key}: job {self.job_id}\n\nCommitted by codex-runner for {self.row['requested_by']}.",
                    author_name=self.settings.git_author_name,
                    author_email=self.settings.git_author_email,
                )
        except GitError as exc:
            self._stage("commit", "failed", error=exc.message)
            return {**result, "error": (exc.code, exc.message)}
        self._stage("commit", "success")
        result.update(
            commit=commit.commit,
            files_changed=commit.files_changed,
            lines_added=commit.lines_added,
            lines_removed=commit.lines_removed,
        )
        if commit.commit:
            self._runner_line(
                f"committed {commit.commit[:12]} on {ws.branch}: {commit.files_changed} "
                f"file{'' if commit.files_changed == 1 else 's'}, "
                f"+{commit.lines_added} -{commit.lines_removed}"
            )
        if self.fenced or self.stop_reason == "cancel":
            # Another instance recovered this job while it committed, or a cancel arrived: push
            # nothing in its name (a canceled job leaves no branch behind on the remote).
            self._stage("push", "skipped")
            return result
        if not repo.push or commit.commit is None:
            self._stage("push", "skipped")
            return result
        # A fenced write again: the lease may have gone while the commit ran (this instance frozen,
        # or cut off from the database, so no heartbeat could tell it), and a push is a write in
        # the job's name that no later compare-and-set can take back. The push is `running` in it:
        # a watchdog on another host that fails this job while it pushes (this instance dead)
        # reads the stages from the row, which must say the push may have happened.
        self._stage("push", "running")
        await self._fenced_update({"stages": list(self.stages.values())})
        if self.stop_reason is None:
            # A cancel another instance's API took reaches this one only at its next poll of
            # cancels (an API-only `serve` before workers): the row says so now. One read per push.
            status = (await asyncio.to_thread(self.rt.jobs.status_of, [self.job_id])).get(self.job_id)
            if status == Status.CANCEL_REQUESTED:
                self.request_stop("cancel")
        if self.fenced or self.stop_reason == "cancel":
            self.stages["push"]["started_at"] = None  # it never started
            self._stage("push", "skipped")
            return result
        try:
            if repo.source_type != "git_url" and ws.push_url is not None:
                self.rt.catalog.check_push_target(repo, ws.push_url)
            with self._killable_git("push"):
                await self._in_thread(push_branch, ws, repo, credential)
        except GitError as exc:
            self._stage("push", "failed", error=exc.message)
            return {**result, "error": (exc.code, exc.message)}
        except RepoNotAllowed as exc:
            self._stage("push", "failed", error=exc.message)
            return {**result, "error": ("push_failed", exc.message)}
        self._stage("push", "success")
        self._runner_line(f"pushed {ws.branch}")
        result["pushed"] = True
        return result

    async def _cleanup(self, ws: Workspace, repo: RepoSpec, *, failed: bool) -> None:
        self._cleaned = True
        self._stage("cleanup", "running")
        if ws.mode == "in_place" and not self.fenced:
            # A fenced write first, as before a commit: an instance that was frozen may find, once
            # it runs again, that another one failed the job and put the repo back, and the
            # operator works there now. Its cleanup must know, before it touches the repo.
            await self._fenced_update({"stages": list(self.stages.values())})
        try:
            # An empty scratch folder is removed here, on the loop (no trip, so the manifest waits
            # for the terminal write); anything else in a thread, after the manifest.
            if not (ws.mode == "scratch" and remove_empty_scratch(ws, self.settings, failed=failed)):
                # Fenced (another instance failed the job): an in_place repo may be another job's now.
                await self._in_thread(
                    cleanup_workspace, ws, repo, self.settings, failed=failed, recovering=self.fenced
                )
        except (GitError, OSError) as exc:
            self._stage("cleanup", "failed", error=getattr(exc, "message", None) or str(exc))
            return
        except Exception as exc:  # a cleanup the runner did not foresee fails the stage, not the job
            log.warning("cleanup_failed", job_id=self.job_id, error_type=type(exc).__name__)
            self._stage("cleanup", "failed", error=f"cleanup failed: {type(exc).__name__}")
            return
        self._stage("cleanup", "success")
        if self.fenced:
            # The row, another instance's now, will never say this cleanup was done: without the
            # mark, a later recovery (a restart, the next in_place job) would run it again, on a
            # kept job branch the operator may have checked out by then.
            await self._in_thread(mark_cleaned_up, self.job_id, self.settings)

    async def _conclude(
        self, outcome: ProcessOutcome | None, result: dict[str, Any] | None, script: ScriptSpec
    ) -> None:
        if outcome is None:
            await self._finish(Status.FAILED, ErrorCode.SPAWN_FAILED, self._spawn_error, None)
            return
        # No process ran (stopped before the spawn): no exit status to report (SPEC §3).
        exit_code = outcome.exit_code if self.proc is not None else None
        if self.agent is not None:
            self.agent.close()
            # codex's own words (its messages, the commands it ran, its errors) go to the job row:
            # redacted as any text bound there.
            result = {**(result or {}), "agent": self._redact_all(self.agent.summary())}
        if outcome.reason == "timeout":
            msg = f"timed out after {self.row['timeout_seconds']} s"
            await self._finish(Status.TIMEOUT, ErrorCode.TIMEOUT, msg, exit_code)
        elif outcome.reason == "cancel":
            await self._finish(Status.CANCELED, ErrorCode.CANCELED, "canceled", exit_code)
        elif outcome.reason == "shutdown":
            await self._finish(Status.FAILED, ErrorCode.RUNNER_SHUTDOWN, "the runner shut down", exit_code)
        elif outcome.reason == "lease_lost":
            self._runner_line("lease lost: another instance recovered this job; writing nothing more")
        elif self.agent is not None and self.agent.failed:
            # codex's events say why, whatever its exit status (1 after turn.failed).
            # Redacted whole, then cut: a secret at the cut is never half shown.
            message = self._redact(f"agent failed: {self.agent.error_message or 'turn failed'}")[:2000]
            await self._finish(Status.FAILED, ErrorCode.AGENT_FAILED, message, exit_code, result=result)
        elif exit_code != 0:
            tail = self._redact(outcome.stderr_tail.decode("utf-8", "replace"))
            msg = script_failure_message(outcome.exit_code, outcome.signal, tail)
            await self._finish(Status.FAILED, ErrorCode.SCRIPT_FAILED, msg, exit_code, result=result)
        elif result is not None and "error" in result:
            code, message = self._shutdown_code(*result.pop("error"))
            await self._finish(Status.FAILED, code, message, exit_code, result=result)
        else:
            await self._finish(Status.SUCCESS, None, None, exit_code, result=result)

    async def _finish(
        self,
        status: Status,
        error_code: str | None,
        message: str | None,
        exit_code: int | None,
        *,
        result: dict[str, Any] | None = None,
    ) -> None:
        if self.fenced:
            return
        if message:
            message = self._redact(message)
        for stage in self.stages.values():
            if stage["status"] == "pending":
                stage["status"] = "skipped"
        line = f"job ending: {status.value}" + (f" ({error_code})" if error_code else "")
        # One trip, shared with the other jobs ending meanwhile (`GroupCommitter`): the log's last
        # line, the status, the terminal manifest (which also records the stage changes not
        # written yet, so they are not written separately).
        self._manifest_dirty = False
        extra = {"exit_code": exit_code, "error_code": error_code, "result": result}
        write = self._terminal_write(status, error_code, message, exit_code, result)
        await self.finisher.commit(
            Ending(
                write,
                functools.partial(self._end_before, line, status, extra),
                self._end_after,
                self._end_written,
            )
        )

    def _log_finished(self, status: str) -> None:
        """SPEC §8's service log line (and the metrics) of the terminal transition; written from
        the committing thread at once, so it is out by the time a client sees the status."""
        duration_ms = int((time.monotonic() - self.started) * 1000)
        self.rt.metrics.observe_finished(self.row["script_key"], status, duration_ms / 1000)
        log.info(
            "job_finished",
            job_id=self.job_id,
            script_key=self.row["script_key"],
            status_from="cancel_requested" if status == Status.CANCELED.value else "running",
            status_to=status,
            duration_ms=duration_ms,
        )

    def _end_before(self, line: str, status: Status, extra: dict[str, Any]) -> str | None:
        """Committing thread, ahead of the status write. The log is complete before the status
        is: a reader that sees a terminal status may treat the file as final (SPEC §5
        `is_complete`). The manifest of the likely outcome is made ready too, in a temporary file
        that the committer fsyncs with the batch's others (the path returned; none on a file system
        in memory, where fsync makes nothing durable); `_end_after` publishes (renames) it once the
        status is written, so it shows up right after the status does, never before."""
        if self.log is not None and self.log.closed:
            # A terminal write that failed closed it; this one (the internal-error fallback) adds
            # its line after the other's.
            self.log = None
        # A scratch job that never spawned has no log file yet; one that cannot be made must not
        # keep the status from going out.
        with contextlib.suppress(OSError):
            self._open_log()
        self._runner_line(line)
        if self.log is not None:
            with contextlib.suppress(OSError):  # the file is closed all the same (LogWriter.close)
                self.log.close()
        self._ending = (status.value, extra, None)
        try:
            prepared = self.manifest.prepare(self._manifest_doc(status.value, extra), sync=False)
        except (OSError, ValueError) as exc:
            log.warning("manifest_write_failed", job_id=self.job_id, error=str(exc))
            return None
        self._ending = (status.value, extra, prepared)
        return prepared if self.manifest.syncs else None

    def _final_status(self, outcome: int) -> str:
        expected = self._ending[0]
        # Attempt 1 matched: a cancel arrived while the script finished on its own.
        return expected if outcome == 0 else Status.CANCELED.value

    def _end_written(self, outcome: Outcome) -> None:
        """Committing thread, right after the status write: its service log line, before the
        committer waits for any fsync."""
        if outcome is not None and not isinstance(outcome, BaseException):
            self._log_finished(self._final_status(outcome))

    def _end_after(self, outcome: Outcome) -> str | None:
        """Committing thread, once the status write is over and the batch's manifest files are
        synced: the durable terminal manifest. Returns the folder the committer must fsync for the
        rename to last, if one was made here."""
        expected, extra, prepared = self._ending
        if isinstance(outcome, BaseException) or outcome is None:
            if prepared is not None:
                self.manifest.discard(prepared)
            if outcome is None:
                # The write matched nothing: another instance ended the job and took the lease
                # (its instance frozen meanwhile). Fenced, as if a heartbeat had said so: the
                # manifest then says what the row does (`_fenced_manifest`), not "unknown".
                self.stop_reason = "lease_lost"
            return None
        final = self._final_status(outcome)
        if prepared is not None and final == expected:
            try:
                self.manifest.publish(prepared, sync_dir=False)
                return str(self.run_dir) if self.manifest.syncs else None
            except OSError as exc:
                log.warning("manifest_write_failed", job_id=self.job_id, error=exc.strerror)
        elif prepared is not None:
            self.manifest.discard(prepared)
        if final == Status.CANCELED.value and expected != final:
            # The cancel won (`_terminal_write`): the row says canceled, and so must the manifest,
            # not the error of the status this job would have had.
            extra = {**extra, "error_code": ErrorCode.CANCELED}
        doc = self._manifest_doc(final, extra)
        if not self._write_manifest(doc, durable=True):
            # A full disk: the launcher's heartbeats write it once there is room, so that the
            # folder does not keep a `running` manifest of an ended job for good.
            self.finisher.owed_manifests.add(self.manifest, doc)
        return None

    def _terminal_write(
        self,
        status: Status,
        error_code: str | None,
        message: str | None,
        exit_code: int | None,
        result: dict[str, Any] | None,
    ) -> OwnerWrite:
        """The compare-and-set(s) of the terminal status, on status and lease."""
        values: dict[str, Any] = {
            "exit_code": exit_code,
            "error_code": error_code,
            "error_message": message,
            "stages": list(self.stages.values()),
            "result": result,
            # A job that ended before its process ids were recorded gets them here (see
            # `PID_RECORD_DELAY_SECONDS`).
            **self._unrecorded_process_values(),
        }
        canceled = Cas(
            (Status.CANCEL_REQUESTED,),
            Status.CANCELED,
            {**values, "error_code": ErrorCode.CANCELED, "error_message": "canceled"},
            "canceled",
        )
        if status is Status.CANCELED:
            return OwnerWrite(self.job_id, self.lease, (replace(canceled, values=values),))
        meta = {"error_code": error_code} if error_code else None
        # If the first does not match, a cancel arrived while the job ended on its own (a failure
        # included): the cancel wins. `cancel_requested` → `failed` is the watchdog's, for an
        # owner that was lost (SPEC §3).
        first = Cas((Status.RUNNING,), status, values, message or status.value, meta)
        return OwnerWrite(self.job_id, self.lease, (first, canceled))


def queue_wait_seconds(row: dict[str, Any]) -> float:
    created: datetime = row["created_at"]
    started: datetime = row["started_at"]
    return max(0.0, (started - created).total_seconds())


def _in_place_change(repo: RepoSpec | None, created_mode: str | None) -> str | None:
    """Why a job cannot run: its repo's workspace mode changed to or from `in_place` since the job
    was created. The claim keeps one active job per in_place repo by the mode a job was created
    with, so a job created in another mode but run in place could share the repo's folder with
    one (SPEC §6), and a job created in place must not run elsewhere unasked. Other changes
    (worktree to clone, say) run in the repo's mode now."""
    if repo is None or created_mode is None or repo.workspace == created_mode:
        return None
    if "in_place" not in (repo.workspace, created_mode):
        return None
    return (
        f"repo {repo.name!r} changed from workspace mode {created_mode} to {repo.workspace} "
        "since the job was created; submit it again"
    )
