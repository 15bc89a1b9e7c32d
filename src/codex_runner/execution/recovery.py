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
from typing import Any

import structlog

from codex_runner.catalog import Catalog
from codex_runner.config import Settings
from codex_runner.execution.gitutil import head_ref, lock_waits_at_most
from codex_runner.execution.manifest import MANIFEST_NAME
from codex_runner.execution.workspace import cleanup_unrecorded, cleanup_workspace, workspace_from_record

log = structlog.get_logger("codex_runner.recovery")

__all__ = ["clean_up_ended_job", "in_place_job_prefix"]

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


#: Left in a run's folder once a recovery did its cleanup: the run's own cleanup stage says so in
#: the row, a recovery's would say nothing, and the next in_place job would redo it (on a kept job
#: branch the operator has checked out by then).
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
            _mark_cleaned_up(job_id, settings)
            return
        ws = workspace_from_record(record, job_id, settings)
        if ws.mode == "in_place" and (
            repo.workspace != "in_place" or os.path.realpath(repo.source) != os.path.realpath(ws.path)
        ):
            return  # the record does not name this repo's folder: nothing of ours to reset
        cleanup_workspace(ws, repo, settings, failed=True, recovering=True)
        _mark_cleaned_up(job_id, settings)
        log.info("recovery_cleaned_up", job_id=job_id, mode=ws.mode)
    except Exception as exc:
        log.warning("recovery_cleanup_failed", job_id=job_id, error=str(exc)[:300])


def _mark_cleaned_up(job_id: str, settings: Settings) -> None:
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
