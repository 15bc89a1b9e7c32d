"""The real codex binary run by the runner as the built-in `codex.exec` script (issue 8): a real
server and launcher on loopback, a `worktree` repo, and the scripted fake Responses API.

Each test starts its own runner whose RUNNER_CODEX_HOME points codex at its own fake server. The
runner's environment holds secrets (encryption key, database URL, API token, JWT secret) and a
stored git credential, so that the test can show none of them reaches codex or the model server.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from codex_runner.config import load_settings
from codex_runner.execution.codex_home import prepare_codex_home
from codex_runner.runtime import Runtime
from codex_runner.server import build_app

from tests.e2e.codex_harness import FAST_RETRIES, MODEL, processes_with_env
from tests.e2e.fake_responses import (
    FakeResponsesServer,
    Turn,
    cut_turn,
    error_turn,
    hang_turn,
    message_item,
    message_turn,
    patch_turn,
    raw_turn,
    shell_turn,
)
from tests.helpers import JobPolling, make_git_repo, serve_app

pytestmark = pytest.mark.e2e

PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+hello from codex\n*** End Patch\n"
DUMMY_OPENAI_KEY = "sk-dummy-openai-key-for-the-fake-server"
HANG_TIMEOUT = 6  # seconds: the script timeout of the runner used for the hang test

TOML = """
[repos.demo]
source = "{repo}"
workspace = "worktree"
credential = "demo-git"
risk_policy = "{risk_policy}"
"""


@dataclass
class CodexRunner(JobPolling):
    url: str
    runtime: Runtime
    fake: FakeResponsesServer
    repo: Path
    secrets: dict[str, str]
    client: httpx.Client = field(init=False)
    wait_timeout = 40.0

    def __post_init__(self) -> None:
        token = self.secrets["admin API token"]
        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )

    def submit(
        self, prompt: str = "Add a file hello.txt that says hello.", script: str = "codex.exec"
    ) -> str:
        args = {"prompt": prompt, "model": MODEL} if script == "codex.exec" else {"prompt": prompt}
        r = self.client.post("/api/runner/jobs", json={"repo": "demo", "script_key": script, "args": args})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def log(self, job_id: str) -> str:
        """The whole (redacted) log of a finished job, page by page."""
        parts: list[str] = []
        offset = 0
        for _ in range(1000):
            page = self.client.get(f"/api/runner/jobs/{job_id}/logs", params={"offset": offset}).json()
            parts.append(page["content"])
            if page["next_offset"] == offset:
                break
            offset = page["next_offset"]
        return "".join(parts)


class EnvironWatcher:
    """Collects, until stopped, the command line and environment of every live process whose
    environment holds RUNNER_JOB_ID=<job id>: codex, its launcher, and the commands it runs."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.seen: dict[int, tuple[str, dict[str, str]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EnvironWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in processes_with_env("RUNNER_JOB_ID", self.job_id):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    raw = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                environ = dict(
                    entry.decode(errors="replace").partition("=")[::2] for entry in raw.split(b"\0") if entry
                )
                self.seen.setdefault(pid, (cmdline, environ))
            self._stop.wait(0.02)


@pytest.fixture
def start_runner(
    tmp_path: Path, codex_bin: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., CodexRunner]]:
    started: list[tuple[Any, CodexRunner]] = []
    fakes: list[FakeResponsesServer] = []

    def start(
        turns: list[Turn],
        risk_policy: str = "conservative",
        extra_toml: str = "",
        operator_config: bool = False,
        **env: str,
    ) -> CodexRunner:
        fake = FakeResponsesServer(turns).__enter__()
        fakes.append(fake)
        codex_home = prepare_codex_home(
            tmp_path / "codex-home",
            base_url=fake.base_url,
            provider_env_key="OPENAI_API_KEY",
            extra_config=FAST_RETRIES,
        )
        if operator_config:
            # The operator's own file (docs/codex.md: how to use another provider): no managed
            # first line, and none of the runner's settings but the provider.
            config = codex_home / "config.toml"
            lines = config.read_text().splitlines(keepends=True)
            config.write_text("".join(line for line in lines[1:] if "shell_environment_policy" not in line))
        repo = make_git_repo(tmp_path / "repo")
        (tmp_path / "runner.toml").write_text(
            textwrap.dedent(TOML.format(repo=repo, risk_policy=risk_policy)) + textwrap.dedent(extra_toml)
        )
        runner_env = {
            "RUNNER_DATABASE_URL": f"sqlite:///{tmp_path / 'runner.db'}",
            "RUNNER_DATA_DIR": str(tmp_path / "data"),
            "RUNNER_ID": "codex-e2e",
            "RUNNER_KILL_GRACE_SECONDS": "1",
            "RUNNER_HEARTBEAT_SECONDS": "1",
            "RUNNER_STALE_AFTER_SECONDS": "10",
            "RUNNER_CODEX_HOME": str(codex_home),
            "RUNNER_ENCRYPTION_KEY": secrets.token_hex(32),
            "RUNNER_TOKEN": f"runner-api-token-{secrets.token_hex(12)}",
            "RUNNER_JWT_SECRET": f"jwt-secret-{secrets.token_hex(12)}",
            **env,
        }
        # The runner's own process environment holds its settings, as in production; codex needs
        # its bin folder and node on PATH, and OPENAI_API_KEY passes through to it.
        for name, value in runner_env.items():
            monkeypatch.setenv(name, value)
        node = shutil.which("node")
        path = [str(Path(codex_bin).parent), *([str(Path(node).parent)] if node else []), "/usr/bin", "/bin"]
        monkeypatch.setenv("PATH", os.pathsep.join(dict.fromkeys(path)))
        monkeypatch.setenv("OPENAI_API_KEY", DUMMY_OPENAI_KEY)
        monkeypatch.delenv("CODEX_HOME", raising=False)
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
        monkeypatch.setenv("HOME", str(home))

        runtime = Runtime.open(load_settings(runner_env, cwd=tmp_path))
        git_secret = f"ghp_{secrets.token_hex(16)}"
        runtime.credentials.set("demo-git", "github.com", "oauth2", git_secret)
        admin_token, _ = runtime.tokens.create("admin", "admin")
        cm = serve_app(build_app(runtime))
        url = cm.__enter__()
        runner_secrets = {
            "RUNNER_ENCRYPTION_KEY": runner_env["RUNNER_ENCRYPTION_KEY"],
            "RUNNER_DATABASE_URL": runner_env["RUNNER_DATABASE_URL"],
            "RUNNER_TOKEN": runner_env["RUNNER_TOKEN"],
            "RUNNER_JWT_SECRET": runner_env["RUNNER_JWT_SECRET"],
            "admin API token": admin_token,
            "git credential": git_secret,
        }
        runner = CodexRunner(url, runtime, fake, repo, runner_secrets)
        started.append((cm, runner))
        return runner

    yield start
    for cm, runner in started:
        runner.client.close()
        cm.__exit__(None, None, None)
        runner.runtime.close()
    for fake in fakes:
        fake.close()


def assert_no_process_left(job_id: str) -> None:
    assert processes_with_env("RUNNER_JOB_ID", job_id) == []
    # codex's sandbox helper (bubblewrap) carries no RUNNER_JOB_ID, but its arguments name the
    # job's workspace: it outlived a codex that failed. The runner's scan after a job (about 1 s
    # later, docs/execution.md) takes it.
    deadline = time.monotonic() + 10
    while left := _naming(job_id):
        assert time.monotonic() < deadline, left
        time.sleep(0.1)


def _naming(job_id: str) -> list[str]:
    """Command lines of live processes that name `job_id` (its workspace)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            except OSError:
                continue
            if job_id.encode() in cmdline:
                found.append(cmdline.replace(b"\0", b" ")[:200].decode(errors="replace"))
    return found


def test_apply_patch_job_commits_the_file_and_reports_the_agent(
    start_runner: Callable[..., CodexRunner],
) -> None:
    runner = start_runner([patch_turn(PATCH), message_turn("Added hello.txt.")])
    job_id = runner.submit()
    job = runner.wait(job_id)

    assert job["status"] == "success", job
    assert_no_process_left(job_id)
    result = job["result"]
    branch = f"runner/{job_id[:8]}"
    assert result["branch"] == branch and result["commit"] and result["files_changed"] == 1
    agent = result["agent"]
    assert agent["failed"] is False and agent["error"] is None
    assert agent["thread_id"]
    assert agent["final_message"] == "Added hello.txt."
    # Two model requests of 1200 input / 80 output tokens each, as scripted.
    assert agent["usage"]["input_tokens"] == 2400 and agent["usage"]["output_tokens"] == 160
    assert [(Path(c["path"]).name, c["kind"]) for c in agent["files_changed"]] == [("hello.txt", "add")]

    # The commit is on the job's branch of the source repo; the base branch is untouched.
    git = ["git", "-C", str(runner.repo)]
    stat = subprocess.run([*git, "show", "--stat", branch], capture_output=True, text=True, timeout=30)
    assert stat.returncode == 0 and "hello.txt" in stat.stdout, stat.stderr
    content = subprocess.run(
        [*git, "show", f"{branch}:hello.txt"], capture_output=True, text=True, timeout=30
    )
    assert content.stdout == "hello from codex\n"
    assert not (runner.repo / "hello.txt").exists()

    log = runner.log(job_id)
    assert '"type":"thread.started"' in log
    assert '"type":"file_change"' in log
    assert '"type":"turn.completed"' in log

    # The model asked for, and the sandbox of the repo's (default, conservative) risk policy.
    first = runner.fake.responses_requests()[0]
    assert first.body["model"] == MODEL
    assert json.loads(first.headers["x-codex-turn-metadata"])["sandbox_mode"] == "workspace-write"


@pytest.mark.parametrize(
    ("turn", "expected"),
    [
        # codex's own words for an HTTP 500, once its retries are spent.
        (error_turn(500), "experiencing high demand"),
        (cut_turn(message_item("half an answer")), "stream disconnected before completion"),
    ],
    ids=["http-500", "stream-cut"],
)
def test_a_failing_model_server_fails_the_job_with_a_readable_error(
    start_runner: Callable[..., CodexRunner], turn: Turn, expected: str
) -> None:
    runner = start_runner([turn])
    job_id = runner.submit()
    job = runner.wait(job_id)

    assert job["status"] == "failed", job
    assert_no_process_left(job_id)
    # codex exits 1 after turn.failed; the error is what its events say, not its last stderr line.
    assert job["error_code"] == "agent_failed", job
    message = job["error_message"]
    assert message.startswith("agent failed: ") and expected in message, message
    assert "Reconnecting" not in message
    agent = job["result"]["agent"]
    assert agent["failed"] is True and expected in agent["error"]
    assert agent["retries"] >= 1
    # Nothing was committed: the job's branch, if kept, has only the base commit.
    log = subprocess.run(
        ["git", "-C", str(runner.repo), "rev-list", "--count", f"runner/{job_id[:8]}", "--"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert log.returncode != 0 or log.stdout.strip() == "1", log.stdout
    assert '"type":"turn.failed"' in runner.log(job_id)


def test_a_model_server_that_never_answers_times_out_and_leaves_no_process(
    start_runner: Callable[..., CodexRunner],
) -> None:
    runner = start_runner([hang_turn()], RUNNER_DEFAULT_TIMEOUT_SECONDS=str(HANG_TIMEOUT))
    started = time.monotonic()
    job_id = runner.submit()
    assert runner.fake.wait_for_requests(1, timeout=20)
    job = runner.wait(job_id, timeout=HANG_TIMEOUT + 20)

    assert job["status"] == "timeout", job
    assert job["error_code"] == "timeout"
    assert time.monotonic() - started < HANG_TIMEOUT + 15
    assert_no_process_left(job_id)


def test_cancel_during_a_codex_run_leaves_no_process(start_runner: Callable[..., CodexRunner]) -> None:
    runner = start_runner([hang_turn()])
    job_id = runner.submit()
    # codex is running once the model server has its request.
    assert runner.fake.wait_for_requests(1, timeout=20)
    assert processes_with_env("RUNNER_JOB_ID", job_id)
    r = runner.client.post(f"/api/runner/jobs/{job_id}/cancel")
    assert r.status_code == 202, r.text
    job = runner.wait(job_id, timeout=20)

    assert job["status"] == "canceled", job
    assert_no_process_left(job_id)


def test_a_permissive_repo_runs_codex_without_a_sandbox(start_runner: Callable[..., CodexRunner]) -> None:
    runner = start_runner([message_turn("Nothing to do.")], risk_policy="permissive")
    job = runner.wait(runner.submit())

    assert job["status"] == "success", job
    assert job["result"]["agent"]["final_message"] == "Nothing to do."
    assert job["result"]["commit"] is None
    metadata = json.loads(runner.fake.responses_requests()[0].headers["x-codex-turn-metadata"])
    assert metadata["sandbox_mode"] == "danger-full-access"


def _probe_the_runners_files(
    start_runner: Callable[..., CodexRunner], tmp_path: Path, more: str = "", **options: Any
) -> tuple[dict[str, Any], str]:
    """A codex job whose model reads a file planted in the data folder and the database, then runs
    `more`: the job, and the commands' output as the model server got it."""
    planted = tmp_path / "data" / "planted-secret"
    command = f"cat {planted}; head -c 15 {tmp_path / 'runner.db'}; echo; {more}echo done"
    runner = start_runner([shell_turn(command), message_turn("ok")], **options)
    planted.write_text("planted-0123456789abcdef\n")
    job = runner.wait(runner.submit())
    assert job["status"] == "success", job
    output = runner.fake.requests[1].raw_body.decode(errors="replace")
    assert "done" in output and "Permission denied" in output, output
    assert "planted-0123456789abcdef" not in output and "SQLite format" not in output
    return job, output


def test_a_permissive_codex_jobs_commands_cannot_read_the_runners_files(
    start_runner: Callable[..., CodexRunner], tmp_path: Path
) -> None:
    """Without a sandbox of codex's own, the runner confines the whole codex run with Landlock
    (docs/execution.md, "Job isolation"): what the model runs cannot read the database or the
    data folder, and codex itself still works (its codex home is granted)."""
    from codex_runner.execution import sandbox

    if sandbox.abi_version() == 0:
        pytest.skip("this kernel has no Landlock")
    _probe_the_runners_files(start_runner, tmp_path, risk_policy="permissive")


def test_a_sandboxed_codex_jobs_commands_cannot_read_the_runners_files(
    start_runner: Callable[..., CodexRunner], tmp_path: Path
) -> None:
    """codex's own sandbox limits writes, not reads, and cannot run under the runner's Landlock:
    the runner gives it a permission profile of the same meaning that denies the runner's files
    (docs/execution.md, "Job isolation"). The workspace stays writable, `.git` read-only."""
    more = "echo made > made.txt && echo wrote-workspace; echo x >> .git/config || echo git-protected; "
    job, output = _probe_the_runners_files(start_runner, tmp_path, more)
    assert "wrote-workspace" in output and "git-protected" in output, output
    assert job["result"]["files_changed"] == 1, job["result"]  # made.txt, committed by the runner


def test_runner_secrets_reach_neither_codex_nor_the_model_server(
    start_runner: Callable[..., CodexRunner],
) -> None:
    # The model runs `env`: its output goes back to the model server, so the server sees the
    # environment of the commands codex runs too. The sleep gives the watcher time.
    runner = start_runner([shell_turn("env; sleep 1"), message_turn("ok")])
    job_id = runner.submit()
    with EnvironWatcher(job_id) as watcher:
        job = runner.wait(job_id)
    assert job["status"] == "success", job
    assert_no_process_left(job_id)

    # The watcher saw codex itself (and the command it ran) while it ran.
    cmdlines = [cmdline for cmdline, _ in watcher.seen.values()]
    assert any("codex" in c and " exec " in f" {c} " for c in cmdlines), cmdlines
    assert any("env; sleep 1" in c for c in cmdlines), cmdlines
    for pid, (cmdline, environ) in watcher.seen.items():
        # The runner's own settings never pass: only the two variables it sets for the script. The
        # runner's own git for the job (prepare, commit, push: run with its minimal git environment,
        # never the script's) carries the job id and, for the kill of a canceled stage, its stage.
        allowed = {"RUNNER_JOB_ID", "RUNNER_WORKSPACE"}
        if "RUNNER_GIT_STAGE" in environ:
            # The runner's git or a program it starts (`sh -c git-receive-pack …` of a local push):
            # known by the environment the runner gives its git, not by the command line.
            assert "RUNNER_WORKSPACE" not in environ and environ.get("GIT_CONFIG_NOSYSTEM") == "1", cmdline
            allowed = {"RUNNER_JOB_ID", "RUNNER_GIT_STAGE"}
        assert {n for n in environ if n.startswith("RUNNER_")} <= allowed, (cmdline, sorted(environ))
        leaked = [
            k for k, v in runner.secrets.items() if v in "\0".join(f"{n}={x}" for n, x in environ.items())
        ]
        assert not leaked, f"{leaked} in the environment of {pid} ({cmdline})"
        assert environ.get("OPENAI_API_KEY", DUMMY_OPENAI_KEY) == DUMMY_OPENAI_KEY

    requests = runner.fake.requests
    assert len(requests) == 2
    for request in requests:
        seen = request.raw_body.decode(errors="replace") + json.dumps(request.headers)
        leaked = [name for name, value in runner.secrets.items() if value in seen]
        assert not leaked, f"{leaked} reached the model server"
    # The provider key is only the Authorization header: the runner-owned codex config keeps
    # *KEY* variables out of the commands the model runs.
    assert requests[0].headers["authorization"] == f"Bearer {DUMMY_OPENAI_KEY}"
    env_output = json.dumps([i for i in requests[1].body["input"] if i.get("type") == "function_call_output"])
    assert f"RUNNER_JOB_ID={job_id}" in env_output
    assert DUMMY_OPENAI_KEY not in env_output
    # Nor are they in the job's log.
    log = runner.log(job_id)
    assert '"type":"command_execution"' in log
    assert not [name for name, value in runner.secrets.items() if value in log]


# An operator's codex script with a flag codex 0.169 no longer has (older docs still show it).
OLD_FLAG_SCRIPT = """
[scripts."codex.old"]
command = ["codex", "exec", "--json", "--full-auto", "-"]
stdin = "{prompt}"
env = ["OPENAI_API_KEY", "CODEX_HOME"]
[scripts."codex.old".args.prompt]
type = "string"
"""


def test_codex_refusing_its_command_line_fails_with_its_own_error(
    start_runner: Callable[..., CodexRunner],
) -> None:
    runner = start_runner([message_turn("never asked")], extra_toml=OLD_FLAG_SCRIPT)
    job_id = runner.submit(script="codex.old")
    job = runner.wait(job_id)

    assert job["status"] == "failed" and job["error_code"] == "script_failed", job
    assert job["exit_code"] == 2
    # codex's (clap's) reason, not the `For more information, try '--help'.` it ends with.
    assert job["error_message"] == "script exited with code 2: error: unexpected argument '--full-auto' found"
    script = next(s for s in job["stages"] if s["name"] == "script")
    assert "Usage: codex exec" in script["error"]  # the whole stderr tail stays on the stage
    assert runner.fake.responses_requests() == []
    assert_no_process_left(job_id)


def test_codex_killed_by_a_signal_says_so(start_runner: Callable[..., CodexRunner]) -> None:
    # No sandbox: the command the model runs can see codex, its parent, and kill it.
    runner = start_runner(
        [shell_turn("kill -KILL $PPID; sleep 30"), message_turn("never")], risk_policy="permissive"
    )
    job_id = runner.submit()
    job = runner.wait(job_id)

    assert job["status"] == "failed" and job["error_code"] == "script_failed", job
    # The npm launcher re-raises its child's signal on itself: 128 + 9.
    assert job["exit_code"] == 137
    # Not codex's start-up warning (its only stderr line when CODEX_HOME is under /tmp).
    assert job["error_message"] == "script killed by SIGKILL (exit code 137)", job["error_message"]
    assert job["result"]["agent"]["failed"] is False


# Two commands that ignore SIGTERM, one of them in a session of its own.
STUBBORN = "setsid sleep 300 >/dev/null 2>&1 </dev/null & trap '' TERM; sleep 301"


@pytest.mark.parametrize(
    ("risk_policy", "how"),
    [("permissive", "cancel"), ("permissive", "timeout"), ("conservative", "cancel")],
)
def test_the_commands_codex_runs_are_gone_when_the_job_ends(
    start_runner: Callable[..., CodexRunner], risk_policy: str, how: str
) -> None:
    # Outside a sandbox codex runs each command in a process group of its own: the job's group
    # (the launcher, codex) is not where they are. In the sandbox they are in bwrap's namespace.
    env = {"RUNNER_DEFAULT_TIMEOUT_SECONDS": str(HANG_TIMEOUT)} if how == "timeout" else {}
    runner = start_runner([shell_turn(STUBBORN), hang_turn()], risk_policy=risk_policy, **env)
    job_id = runner.submit()
    deadline = time.monotonic() + 20
    while len(sleeps := _sleeps_of(job_id)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(sleeps) == 2, sleeps
    if how == "cancel":
        assert runner.client.post(f"/api/runner/jobs/{job_id}/cancel").status_code == 202
    stopped = time.monotonic()
    job = runner.wait(job_id, timeout=HANG_TIMEOUT + 20)

    assert job["status"] == ("canceled" if how == "cancel" else "timeout"), job
    # Gone by the terminal status (SPEC §3), within the grace (1 s) and a second.
    assert_no_process_left(job_id)
    if how == "cancel":
        assert time.monotonic() - stopped < 1 + 1 + 1  # + a second for the polling of `wait`


def _sleeps_of(job_id: str) -> list[int]:
    pids = []
    for pid in processes_with_env("RUNNER_JOB_ID", job_id):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0"):
                pids.append(pid)
        except OSError:
            continue
    return pids


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def _item_done(item: dict[str, Any] | bytes) -> bytes:
    body = item if isinstance(item, bytes) else json.dumps(item).encode()
    return (
        b'event: response.output_item.done\ndata: {"type":"response.output_item.done","output_index":0,"item":'
        + body
        + b"}\n\n"
    )


_COMPLETED = _sse(
    {
        "type": "response.completed",
        "response": {
            "id": "r1",
            "status": "completed",
            "output": [],
            "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2},
        },
    }
)
_BAD_UTF8 = json.dumps(message_item("bad XX text")).encode().replace(b"XX", b"\xff\xfe\xc3")


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (_item_done(_BAD_UTF8) + _COMPLETED, "failed", "invalid utf-8"),
        (_item_done(b"[" * 100_000 + b"]" * 100_000) + _COMPLETED, "success", None),
        (_item_done(message_item("A" * 3_000_000)) + _COMPLETED, "success", None),
        (b"\x00\x01 not an event stream\n\n" * 1000, "failed", "stream closed before response.completed"),
    ],
    ids=["invalid-utf8", "nested-100k-deep", "3MB-message", "garbage"],
)
def test_hostile_model_output_ends_the_job_cleanly(
    start_runner: Callable[..., CodexRunner], body: bytes, status: str, error: str | None
) -> None:
    runner = start_runner([raw_turn(body)])
    job_id = runner.submit()
    job = runner.wait(job_id)

    assert job["status"] == status, job
    assert_no_process_left(job_id)
    agent = job["result"]["agent"]
    if error is None:
        assert agent["failed"] is False and job["error_code"] is None
    else:
        assert job["error_code"] == "agent_failed" and error in job["error_message"], job
    # The log holds codex's lines whole (a 3 MB event line too), and pages to its end.
    log = runner.log(job_id)
    assert log.rstrip().endswith(f"job ending: {status}" + ("" if error is None else " (agent_failed)"))
    if len(body) > 2_000_000:  # the 3 MB message: over the parser's 1 MiB line cap, in the log whole
        assert "A" * 3_000_000 in log


def test_an_operators_own_codex_config_still_keeps_the_api_key_from_the_commands(
    start_runner: Callable[..., CodexRunner],
) -> None:
    # codex's own default passes its whole environment to the commands the model runs; only the
    # runner-written config.toml said otherwise, so `echo $OPENAI_API_KEY | rev` put the key in a
    # user's log, past the masking of its exact value.
    runner = start_runner([shell_turn("env"), message_turn("ok")], operator_config=True)
    job_id = runner.submit()
    job = runner.wait(job_id)

    assert job["status"] == "success", job
    requests = runner.fake.responses_requests()
    assert requests[0].headers["authorization"] == f"Bearer {DUMMY_OPENAI_KEY}"  # codex has it
    env_output = json.dumps([i for i in requests[1].body["input"] if i.get("type") == "function_call_output"])
    assert f"RUNNER_JOB_ID={job_id}" in env_output
    assert DUMMY_OPENAI_KEY not in env_output


def test_a_jobs_conversation_is_not_kept_in_the_shared_codex_home(
    start_runner: Callable[..., CodexRunner],
) -> None:
    """Every job of a runner shares one CODEX_HOME, and every job's commands can read it (codex's
    sandbox limits writes, not reads): the transcript codex kept of each run there
    (`sessions/…/rollout-*.jsonl`, the whole conversation) gave any later job, another user's
    included, every earlier prompt. The built-in script runs codex `--ephemeral`."""
    runner = start_runner([message_turn("Nothing to do.")])
    prompt = f"a prompt no other job may read {uuid.uuid4().hex}"
    job = runner.wait(runner.submit(prompt))
    assert job["status"] == "success", job
    home = Path(os.environ["RUNNER_CODEX_HOME"])
    kept = [
        path.relative_to(home)
        for path in home.rglob("*")
        if path.is_file() and prompt.encode() in path.read_bytes()
    ]
    assert kept == [], kept
