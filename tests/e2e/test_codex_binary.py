"""The real codex binary against a scripted fake Responses API on loopback, run directly (no runner).

Set CODEX_RUNNER_RECORD_EVENTS=1 to rewrite the event fixtures in data/ from these runs (after a
codex upgrade, for instance); tests/unit/test_codex_events.py reads them.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from pathlib import Path

import pytest

from codex_runner.execution.codex_home import prepare_codex_home

from tests.e2e.codex_harness import (
    FAKE_KEY,
    FAKE_KEY_VAR,
    FAST_RETRIES,
    MODEL,
    CodexRun,
    codex_argv,
    group_members,
    minimal_env,
    processes_with_env,
    run_codex,
)
from tests.e2e.fake_responses import (
    FakeResponsesServer,
    Turn,
    cut_turn,
    error_turn,
    hang_turn,
    iter_tool_names,
    message_item,
    message_turn,
    patch_turn,
    shell_turn,
)

pytestmark = pytest.mark.e2e

DATA = Path(__file__).parent / "data"
RECORD = os.environ.get("CODEX_RUNNER_RECORD_EVENTS") == "1"
RUN_TIMEOUT = 30.0
PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+hello from codex\n*** End Patch\n"


def _codex(
    codex_bin: str,
    workspace: Path,
    user_home: Path,
    server: FakeResponsesServer,
    *,
    timeout: float = RUN_TIMEOUT,
    prompt: str = "Add a file hello.txt that says hello.",
) -> tuple[CodexRun, Path]:
    codex_home = prepare_codex_home(
        user_home / "codex-home",
        base_url=server.base_url,
        provider_env_key=FAKE_KEY_VAR,
        extra_config=FAST_RETRIES,
    )
    argv = codex_argv(codex_bin, workspace)
    run = asyncio.run(run_codex(argv, minimal_env(codex_home, user_home), prompt, timeout=timeout))
    return run, codex_home


def _record(name: str, run: CodexRun) -> None:
    if RECORD:
        (DATA / name).write_bytes(run.stdout)


def _serve(turns: list[Turn]) -> FakeResponsesServer:
    return FakeResponsesServer(turns)


def test_apply_patch_adds_a_file_and_the_summary_tells(
    codex_bin: str, git_workspace: Path, user_home: Path
) -> None:
    turns = [shell_turn("echo hello-from-shell"), patch_turn(PATCH), message_turn("Added hello.txt.")]
    with _serve(turns) as server:
        run, _ = _codex(codex_bin, git_workspace, user_home, server)
    _record("codex_events_sample.jsonl", run)

    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert not run.timed_out and run.leftovers == []
    assert (git_workspace / "hello.txt").read_text() == "hello from codex\n"
    summary = run.parser.summary()
    assert summary["failed"] is False and summary["error"] is None
    assert summary["thread_id"]
    assert summary["final_message"] == "Added hello.txt."
    # Usage adds up the three model requests of the turn (1200 input tokens each, as scripted).
    assert summary["usage"]["input_tokens"] == 3600
    assert summary["usage"]["output_tokens"] == 240
    assert summary["commands"] == [{"command": "/bin/bash -lc 'echo hello-from-shell'", "exit_code": 0}]
    assert summary["files_changed"] == [{"path": str(git_workspace / "hello.txt"), "kind": "add"}]

    requests = server.responses_requests()
    assert len(requests) == 3
    first = requests[0]
    assert first.path == "/v1/responses"
    assert first.headers["authorization"] == f"Bearer {FAKE_KEY}"
    assert first.headers["accept"] == "text/event-stream"
    assert first.body["model"] == MODEL and first.body["stream"] is True
    tools = set(iter_tool_names(first))
    assert ("function", "exec_command") in tools
    assert ("custom", "apply_patch") in tools
    # Each later request carries the output of the tool call before it.
    second_types = [item.get("type") for item in requests[1].body["input"]]
    third_types = [item.get("type") for item in requests[2].body["input"]]
    assert "function_call_output" in second_types
    assert "custom_tool_call_output" in third_types
    outputs = [i for i in requests[1].body["input"] if i.get("type") == "function_call_output"]
    assert "hello-from-shell" in json.dumps(outputs)
    # Nothing but the fake server was asked anything.
    assert {(r.method, r.path) for r in server.requests} == {("POST", "/v1/responses")}


def test_http_500_fails_with_a_readable_error(codex_bin: str, git_workspace: Path, user_home: Path) -> None:
    with _serve([error_turn(500)]) as server:
        run, _ = _codex(codex_bin, git_workspace, user_home, server)
    _record("codex_events_http_500.jsonl", run)

    # codex 0.169 exits 1 after its retries, and says why on stdout as turn.failed.
    assert run.returncode == 1
    assert run.parser.failed
    message = run.parser.error_message
    assert message and not message.startswith("Reconnecting")
    assert run.parser.retries >= 1
    assert len(server.responses_requests()) >= 2
    assert run.leftovers == []


def test_stream_cut_before_completion_fails(codex_bin: str, git_workspace: Path, user_home: Path) -> None:
    with _serve([cut_turn(message_item("half an answer"))]) as server:
        run, _ = _codex(codex_bin, git_workspace, user_home, server)
    _record("codex_events_stream_cut.jsonl", run)

    assert run.returncode == 1
    assert run.parser.failed
    assert "stream disconnected before completion" in (run.parser.error_message or "")
    # Items that arrived before the cut are still reported, once per attempt.
    assert run.parser.final_message == "half an answer"
    assert run.leftovers == []


def test_a_server_that_never_answers_is_killed_by_the_timeout(
    codex_bin: str, git_workspace: Path, user_home: Path
) -> None:
    started = time.monotonic()
    with _serve([hang_turn()]) as server:
        run, codex_home = _codex(codex_bin, git_workspace, user_home, server, timeout=6.0)
        assert server.wait_for_requests(1, timeout=1)
    # The server's shutdown did not wait for the hung request.
    assert time.monotonic() - started < 20

    assert run.timed_out
    assert not run.parser.failed and run.parser.final_message is None
    assert group_members(run.pgid) == []
    assert processes_with_env("CODEX_HOME", str(codex_home)) == []


def test_an_unreachable_server_is_retried_until_the_timeout(
    codex_bin: str, git_workspace: Path, user_home: Path
) -> None:
    # codex ignores its retry limits for a refused connection and waits for the network forever.
    with _serve([message_turn("unused")]) as server:
        pass
    run, codex_home = _codex(codex_bin, git_workspace, user_home, server, timeout=5.0)

    assert run.timed_out
    assert not run.parser.failed
    assert run.parser.retries >= 1
    assert (run.parser.last_retry_notice or "").startswith("Reconnecting... waiting for network")
    assert group_members(run.pgid) == []
    assert processes_with_env("CODEX_HOME", str(codex_home)) == []


def test_runner_secrets_never_reach_the_model_server(
    codex_bin: str, git_workspace: Path, user_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner_secrets = {
        "RUNNER_ENCRYPTION_KEY": secrets.token_hex(32),
        "RUNNER_DATABASE_URL": f"postgresql://runner:{secrets.token_hex(8)}@db.internal/runner",
        "OPENAI_API_KEY": f"sk-runner-{secrets.token_hex(8)}",
    }
    for name, value in runner_secrets.items():
        monkeypatch.setenv(name, value)
    turns = [shell_turn("env"), message_turn("ok")]
    with _serve(turns) as server:
        run, codex_home = _codex(codex_bin, git_workspace, user_home, server)

    assert run.returncode == 0, run.stderr.decode(errors="replace")
    requests = server.requests
    assert len(requests) == 2
    for request in requests:
        seen = request.raw_body.decode(errors="replace") + json.dumps(request.headers)
        for name, value in runner_secrets.items():
            assert value not in seen, f"{name} reached the model server"
        # The provider key goes in the Authorization header and nowhere else: the runner-owned
        # config keeps *KEY* variables out of the environment of commands the model runs.
        assert FAKE_KEY not in request.raw_body.decode(errors="replace")
    env_output = json.dumps([i for i in requests[1].body["input"] if i.get("type") == "function_call_output"])
    assert f"CODEX_HOME={codex_home}" in env_output
    assert FAKE_KEY_VAR not in env_output
