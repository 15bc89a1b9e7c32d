"""The workspace cleanup of a run that did not do its own: the runner crashed (start-up recovery of
its `RUNNER_ID`), or a watchdog failed the job because its instance stopped heartbeating (dead,
or frozen), or an in_place repo is found on the branch of a job that has ended. From the
workspace record in the run's manifest; by the runner's names when the crash came before it."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from codex_runner.catalog import Catalog
from codex_runner.config import Settings
from codex_runner.execution.gitutil import head_ref, lock_waits_at_most
from codex_runner.execution.manifest import MANIFEST_NAME, ManifestWriter, OwedManifests
from codex_runner.execution.workspace import cleanup_unrecorded, cleanup_workspace, workspace_from_record
from codex_runner.store.records import iso, utcnow

if TYPE_CHECKING:
    from codex_runner.store.jobs import JobStore

log = structlog.get_logger("codex_runner.recovery")

__all__ = [
    "clean_up_ended_job",
    "clean_up_failed_elsewhere",
    "clean_up_jobs_failed_elsewhere",
    "ended_stages",
    "in_place_job_prefix",
    "mark_cleaned_up",
    "record_recovery",
]

_JOB_BRANCH = re.compile(r"refs/heads/runner/([0-9A-Fa-f]{8})")


def clean_up_ended_job(
    job: Mapping[str, Any], catalog: Catalog, settings: Settings, *, lock_wait: float | None = None
) -> None:
    """The cleanup SPEC §6 (RUNNER_CLEANUP_AFTER_JOB) asks for, of a job whose run ended without it:
    a worktree or clone folder goes, and an in_place repo still on the job's branch goes back to
    its own, which would otherwise refuse every later job; what was left uncommitted there is kept
    in a stash entry. Nothing for a job whose run did its cleanup (an in_place repo on its kept
    branch is then the operator's doing). `lock_wait`: give up after that long on a busy repo
    lock. Never raises; logs what it did."""
    repo = catalog.repos.get(job["repo"])
    if repo is None or _cleaned_up(job, settings):
        return
    with lock_waits_at_most(lock_wait) if lock_wait is not None else contextlib.nullcontext():
        _clean_up(job, repo, settings)


def clean_up_failed_elsewhere(
    job: Mapping[str, Any], catalog: Catalog, settings: Settings, *, owed: OwedManifests | None = None
) -> None:
    """At start-up, for a job of this `RUNNER_ID` that another instance's watchdog failed while
    this one was down: that watchdog saw neither its run folder nor its workspace (another data
    folder, or another host), so its manifest still says `running` and its workspace is still
    here. Only for a run folder on this host that no recovery has cleaned up yet."""
    if not (settings.runs_dir / str(job["id"])).is_dir() or _cleaned_up(job, settings):
        return
    if _manifest(job, settings).get("status") == "running":
        stages = _stage_list(job.get("stages"))
        record_recovery(job, settings, error_code=str(job["error_code"]), stages=stages, owed=owed)
    clean_up_ended_job(job, catalog, settings)


#: How many job ids `clean_up_jobs_failed_elsewhere` reads at a time: ids only (some 40 kB), and
#: each page's query goes over all of the id's failed rows (`ix_runner_jobs_runner_status`), so
#: not too few.
FAILED_ELSEWHERE_PAGE = 1000


def clean_up_jobs_failed_elsewhere(
    store: JobStore, runner_id: str, catalog: Catalog, settings: Settings, *, owed: OwedManifests | None
) -> None:
    """`clean_up_failed_elsewhere` for every job of `runner_id` a watchdog failed. With a fixed
    `RUNNER_ID` those are all of its history (till retention), read at every start: their ids come
    a page at a time, and only the rows of those whose run folder is here and not marked cleaned
    up are read, so memory stays one page whatever the history."""
    after: str | None = None
    while True:
        ids = store.stale_failed_ids_of_runner(runner_id, after=after, limit=FAILED_ELSEWHERE_PAGE)
        here = [job_id for job_id in ids if _left_here(job_id, settings)]
        for job in store.recovery_rows(here):
            clean_up_failed_elsewhere(job, catalog, settings, owed=owed)
        if len(ids) < FAILED_ELSEWHERE_PAGE:
            return
        after = ids[-1]


def _left_here(job_id: str, settings: Settings) -> bool:
    """A run folder on this host that no recovery has marked: the part of `clean_up_failed_
    elsewhere`'s check that needs no row (the row's cleanup stage is checked there)."""
    folder = settings.runs_dir / job_id
    return folder.is_dir() and not (folder / RECOVERED_MARK).exists()


#: Left in a run's folder once a recovery did its cleanup, or a fenced run its own: the run's own
#: cleanup stage says so in the row, theirs would say nothing, and a later recovery (the next
#: in_place job, a restart) would redo it (on a kept job branch the operator has checked out by then).
RECOVERED_MARK = "recovery-cleaned-up"


def _cleaned_up(job: Mapping[str, Any], settings: Settings) -> bool:
    if (settings.runs_dir / str(job["id"]) / RECOVERED_MARK).exists():
        return True
    stages = job.get("stages")
    if isinstance(stages, str):
        try:
            stages = json.loads(stages)
        except ValueError:
            return False
    return isinstance(stages, list) and any(
        isinstance(s, dict) and s.get("name") == "cleanup" and s.get("status") == "success" for s in stages
    )


def _clean_up(job: Mapping[str, Any], repo: Any, settings: Settings) -> None:
    job_id = str(job["id"])
    try:
        doc = json.loads((settings.runs_dir / job_id / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        doc = {}  # the run never wrote one here (it crashed first, or ran with another data folder)
    except (OSError, ValueError):
        return
    record = doc.get("workspace") if isinstance(doc, dict) else None
    try:
        if not isinstance(record, dict):
            # The crash came during the prepare, before the manifest recorded the workspace: what it
            # may have made is found by the runner's names for it.
            mode = job.get("workspace_mode") or repo.workspace
            if cleanup_unrecorded(repo, job_id, str(mode), settings):
                log.info("recovery_cleaned_up", job_id=job_id, mode=mode, recorded=False)
            mark_cleaned_up(job_id, settings)
            return
        ws = workspace_from_record(record, job_id, settings)
        if ws.mode == "in_place" and (
            repo.workspace != "in_place" or os.path.realpath(repo.source) != os.path.realpath(ws.path)
        ):
            return  # the record does not name this repo's folder: nothing of ours to reset
        cleanup_workspace(ws, repo, settings, failed=True, recovering=True)
        mark_cleaned_up(job_id, settings)
        log.info("recovery_cleaned_up", job_id=job_id, mode=ws.mode)
    except Exception as exc:
        log.warning("recovery_cleanup_failed", job_id=job_id, error=str(exc)[:300])


def mark_cleaned_up(job_id: str, settings: Settings) -> None:
    folder = settings.runs_dir / job_id
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RECOVERED_MARK).touch()
    except OSError as exc:
        log.warning("recovery_mark_failed", job_id=job_id, error=exc.strerror)


def in_place_job_prefix(source: str) -> str | None:
    """The job id prefix of the runner branch (`runner/<id8>`) an in_place repo is on, if it is on
    one: a file read, cheap enough for every in_place prepare."""
    dot_git = Path(source) / ".git"
    if not dot_git.is_dir():
        return None  # a .git file or a bare repo: not a layout in_place jobs leave behind
    match = _JOB_BRANCH.fullmatch(head_ref(dot_git) or "")
    return match.group(1).lower() if match else None


#: The `error` of the stage a recovered job was in: its run never got to say how it ended.
STAGE_CUT_SHORT = "the runner instance running this job stopped during this stage"
#: The same for the push, which is a write outside the runner: it may have landed.
PUSH_CUT_SHORT = (
    "the runner instance running this job stopped during the push: the job's branch may have "
    "reached the remote all the same"
)


def ended_stages(job: Mapping[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """The stages of a job that a recovery fails, as its run would have left them: the stage it was
    in `failed`, those it never reached `skipped`. From the run manifest when it is on this host
    (written at every stage change, so it is ahead of the row, which gets the stages only with the
    pid record and the terminal write), else from the row."""
    stages = _stage_list(_manifest(job, settings).get("stages")) or _stage_list(job.get("stages"))
    now = iso(utcnow())
    out = []
    for stage in stages:
        stage = dict(stage)
        if stage.get("status") == "running":
            cut_short = PUSH_CUT_SHORT if stage.get("name") == "push" else STAGE_CUT_SHORT
            stage.update(status="failed", finished_at=now, error=cut_short)
        elif stage.get("status") == "pending":
            stage["status"] = "skipped"
        out.append(stage)
    return out


def recovered_message(message: str, job: Mapping[str, Any], stages: list[dict[str, Any]]) -> str:
    """A recovered job's `error_message`: `message`, plus what a user must know about work the run
    did outside the runner before it was cut short. A push that was under way may have reached the
    remote although the job is `failed` (the row cannot tell: the push was its last step); the
    branch is named so the user can look."""
    if any(s.get("name") == "push" and s.get("error") == PUSH_CUT_SHORT for s in stages):
        branch = f"runner/{str(job['id'])[:8]}"
        return f"{message}, during the push of {branch}: that branch may be on the remote all the same"
    return message


def record_recovery(
    job: Mapping[str, Any],
    settings: Settings,
    *,
    error_code: str,
    stages: list[dict[str, Any]],
    owed: OwedManifests | None = None,
) -> None:
    """Rewrites the run manifest on this host, if there is one, with the terminal status a recovery
    wrote to the row: left alone it said `running` for ever (its run was killed, or fenced). Never
    raises: the row is what counts. A write the disk refuses (full) goes to `owed`, the launcher's
    manifests to write again once there is room, as a run's own terminal manifest does."""
    doc = _manifest(job, settings)
    if not doc:
        return
    doc.update(
        status="failed",
        error_code=error_code,
        stages=stages,
        updated_at=iso(utcnow()),
    )
    writer = ManifestWriter(settings.runs_dir / str(job["id"]))
    try:
        writer.update(doc, force=True, durable=True)
    except (OSError, ValueError) as exc:
        log.warning("manifest_write_failed", job_id=str(job["id"]), error=str(exc)[:300])
        if isinstance(exc, OSError) and owed is not None:
            owed.add(writer, doc)


def _manifest(job: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    try:
        doc = json.loads((settings.runs_dir / str(job["id"]) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _stage_list(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    if not isinstance(value, list):
        return []
    return [s for s in value if isinstance(s, dict)]
