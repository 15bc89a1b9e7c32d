"""`codex-runner jobs …` commands in-process (typer's CliRunner) against a scripted transport."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from typer.testing import CliRunner

from codex_runner.cli import app
from codex_runner.cli import jobs as jobs_module
from codex_runner.cli.client import RunnerClient

Handler = Callable[[httpx.Request], httpx.Response]


def _serve(monkeypatch: pytest.MonkeyPatch, handler: Handler) -> None:
    monkeypatch.setattr(
        jobs_module,
        "_client",
        lambda: RunnerClient("http://runner", "t", transport=httpx.MockTransport(handler)),
    )


def _stream(*events: tuple[str, dict[str, object]]) -> httpx.Response:
    body = "".join(f"event: {name}\r\ndata: {json.dumps(data)}\r\n\r\n" for name, data in events)
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())


def _log_then_end(content: str, status: str) -> httpx.Response:
    log = {"offset": 0, "next_offset": len(content.encode()), "content": content}
    return _stream(("log", log), ("end", {"status": status}))


@pytest.mark.parametrize("flag", ["--repo", "--repo-id"])
def test_jobs_list_filters_by_a_repo_name_or_id(monkeypatch: pytest.MonkeyPatch, flag: str) -> None:
    """The server takes a repo's name in `repo_id` as well as its id: `--repo NAME` says so."""
    sent: list[httpx.QueryParams] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.params)
        return httpx.Response(200, json={"items": [], "total": 0, "limit": 50, "offset": 0})

    _serve(monkeypatch, handler)
    done = CliRunner().invoke(app, ["jobs", "list", flag, "widgets"])
    assert done.exit_code == 0, done.output
    assert [p.get("repo_id") for p in sent] == ["widgets"]


def test_following_a_queued_job_says_why_nothing_comes_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    """`jobs logs -f` of a job no instance has started waited without a word: it now says on
    stderr that the job is queued, and follows the log once the job runs; stdout is the log alone."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/logs/stream"):
            return _log_then_end("hello\n", "success")
        assert request.url.path == "/api/runner/jobs/j1"
        return httpx.Response(200, json={"id": "j1", "status": "queued"})

    _serve(monkeypatch, handler)
    done = CliRunner().invoke(app, ["jobs", "logs", "-f", "j1"])
    assert done.exit_code == 0, done.output
    assert done.stdout == "hello\n"
    assert "job j1 is queued; waiting for it to start" in done.stderr, done.stderr


@pytest.mark.parametrize("age,hinted", [(3, False), (60, True)])
def test_following_a_job_queued_for_long_asks_whether_a_worker_runs(
    monkeypatch: pytest.MonkeyPatch, age: int, hinted: bool
) -> None:
    """As `submit --wait` does once a job has been queued for 10 s: nothing starts a job but a
    `serve` or `worker` with RUNNER_ENABLED=true."""
    created = (datetime.now(UTC) - timedelta(seconds=age)).isoformat(timespec="milliseconds")

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/logs/stream"):
            return _log_then_end("hello\n", "success")
        return httpx.Response(200, json={"id": "j1", "status": "queued", "created_at": created[:-6] + "Z"})

    _serve(monkeypatch, handler)
    done = CliRunner().invoke(app, ["jobs", "logs", "-f", "j1"])
    assert done.exit_code == 0 and done.stdout == "hello\n", done.output
    assert "queued" in done.stderr and ("RUNNER_ENABLED=true running?" in done.stderr) == hinted, done.stderr


@pytest.mark.parametrize("status", ["running", "success"])
def test_following_a_started_job_says_nothing_of_a_queue(
    monkeypatch: pytest.MonkeyPatch, status: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/logs/stream"):
            return _log_then_end("hello\n", "success")
        return httpx.Response(200, json={"id": "j1", "status": status})

    _serve(monkeypatch, handler)
    done = CliRunner().invoke(app, ["jobs", "logs", "-f", "j1"])
    assert done.exit_code == 0, done.output
    assert done.stdout == "hello\n" and "queued" not in done.stderr, done.stderr
