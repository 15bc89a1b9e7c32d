"""Which instances write their job logs into a log folder.

A job's log is a file in the `RUNNER_LOG_DIR` of the instance that runs it. Instances that keep
their own data folder (another host, or another folder on one host) do not see each other's logs:
without a way to tell "not written yet" (a job still in its claim or prepare) from "written
elsewhere", the API answered the latter as an empty, complete log. Each launcher therefore leaves
a mark in its log folder at start-up, `.writer-<RUNNER_ID>` (a dot file: backups and retention
skip it); a folder shared by several instances (one data folder, or shared storage) holds the mark
of each of them.
"""

from __future__ import annotations

from pathlib import Path

MARK_PREFIX = ".writer-"


def _mark(log_dir: Path, runner_id: str) -> Path:
    return log_dir / f"{MARK_PREFIX}{runner_id}"


def mark_writer(log_dir: Path, runner_id: str) -> None:
    """Records that `runner_id` writes its job logs into `log_dir` (raises OSError)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    _mark(log_dir, runner_id).touch(mode=0o600, exist_ok=True)


def writes_here(log_dir: Path, runner_id: str) -> bool:
    """Whether `runner_id` marked `log_dir` as its log folder."""
    return _mark(log_dir, runner_id).exists()
