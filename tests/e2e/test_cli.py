"""The real `codex-runner` console script against a real `codex-runner serve` on loopback.

The main server runs with RUNNER_ENABLED=false, so jobs stay queued and nothing here depends on
the launcher; the few tests of `submit --wait` outcomes start their own server with the launcher
and skip while it cannot be imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from codex_runner import __version__
from codex_runner.config import load_settings
from codex_runner.runtime import Runtime

from tests.helpers import CLI, answers_healthz, cli_token, free_port, make_git_repo, wait_until

COMMAND_TIMEOUT = 60
START_TIMEOUT = 30
STOP_TIMEOUT = 20
PYTHON = sys.executable

RUNNER_TOML = """
[repos.demo]
source = {repo}
branch = "main"

[scripts.echo]
command = [{python}, "-c", "import sys; print(' '.join(sys.argv[1:]))"]
timeout_seconds = 60

[scripts.echo.args.message]
type = "string"
required = true
max_length = 1000
flag = "--message"

[scripts.echo.args.count]
type = "int"
min = 1
max = 10
default = 1
flag = "--count"

[scripts.echo.args.loud]
type = "bool"
default = false
flag = "--loud"

[scripts.fail]
command = [{python}, "-c", "import sys; print('about to fail'); sys.exit(3)"]

[scripts.complain]
command = [{python}, "-c", "import sys; sys.stderr.write('disk quota exceeded\\\\x1b[2J\\\\n'); sys.exit(1)"]

[scripts.slow]
command = [{python}, "-c", "import time; time.sleep(30)"]
timeout_seconds = 1
"""


@dataclass
class Server:
    url: str
    root: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path

    def client_env(self, token: str, **extra: str) -> dict[str, str]:
        return {**self.env, "RUNNER_URL": self.url, "RUNNER_TOKEN": token, **extra}


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any RUNNER_* setting of the developer's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env.update(extra)
    return env


def cli(
    *args: str, env: Mapping[str, str], input: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        env=dict(env),
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        cwd=cwd,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """A failure: non-zero exit, exactly one `error: …` line on stderr, no traceback, no stdout."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""
    return lines[0]


def start_server(root: Path, *, enabled: bool, wrapper: Sequence[str] = (), **extra: str) -> Server:
    """`codex-runner serve` on a free port, healthy; `wrapper` comes before it on the command line
    (`setpriv …`)."""
    root.mkdir(parents=True, exist_ok=True)
    repo = make_git_repo(root / "repo")
    config = root / "runner.toml"
    config.write_text(
        textwrap.dedent(RUNNER_TOML).format(repo=json.dumps(str(repo)), python=json.dumps(PYTHON))
    )
    port = free_port()
    env = clean_env(
        **{
            "RUNNER_CONFIG": str(config),
            "RUNNER_DATA_DIR": str(root / "data"),
            "RUNNER_PORT": str(port),
            "RUNNER_ENABLED": "true" if enabled else "false",
            "RUNNER_LOG_FORMAT": "console",
            "RUNNER_KILL_GRACE_SECONDS": "2",
            **extra,
        }
    )
    log = root / "serve.log"
    with log.open("wb") as fh:
        # Its own session, so teardown can signal the server and anything it started.
        proc = subprocess.Popen(
            [*wrapper, CLI, "serve"], env=env, cwd=root, stdout=fh, stderr=fh, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            return True  # reported below
        return answers_healthz(url)

    ready = wait_until(healthy, timeout=START_TIMEOUT, interval=0.1)
    if proc.poll() is not None or not ready:
        stop(proc)
        pytest.fail(
            f"`codex-runner serve` did not become healthy:\n{log.read_text(errors='replace')[-4000:]}"
        )
    return Server(url, root, env, proc, log)


@contextlib.contextmanager
def serving(root: Path, *, enabled: bool, **extra: str) -> Iterator[Server]:
    """`start_server` for the length of a `with` (a fixture's), stopped however it ends."""
    srv = start_server(root, enabled=enabled, **extra)
    try:
        yield srv
    finally:
        stop(srv.proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("cli"), enabled=False) as srv:
        yield srv


@pytest.fixture(scope="module")
def admin_token(server: Server) -> str:
    result = cli("tokens", "create", "--user", "root", "--role", "admin", env=server.env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def api_get(server: Server, token: str, path: str) -> httpx.Response:
    return httpx.get(server.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def submit(
    server: Server, token: str, *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return cli("submit", "demo", *args, env=server.client_env(token), input=input)


# -- local commands -------------------------------------------------------------------------


def assert_no_trailing_blanks(output: str) -> None:
    """Tables are read by scripts (`diff`, `grep`): rich pads every cell, the last one's too."""
    padded = [line for line in output.splitlines() if line != line.rstrip()]
    assert not padded, padded


def test_version_prints_the_package_version() -> None:
    result = cli("version", env=clean_env())
    assert result.returncode == 0
    assert result.stdout == f"codex-runner {__version__}\n"


def test_ctrl_c_while_the_cli_loads_is_exit_130_without_a_traceback() -> None:
    """The CLI's imports take about a second; a Ctrl-C then (a command started by mistake) printed
    a KeyboardInterrupt traceback out of whichever library was loading."""
    program = textwrap.dedent(
        """
        import builtins, os, signal
        real_import = builtins.__import__
        def hooked(name, *args, **kwargs):
            if name == "typer":  # the first heavy import: Ctrl-C now
                os.kill(os.getpid(), signal.SIGINT)
            return real_import(name, *args, **kwargs)
        builtins.__import__ = hooked
        from codex_runner.cli import main
        main()
        """
    )
    result = subprocess.run(
        [PYTHON, "-c", program, "version"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr
    assert result.returncode == 130 and result.stdout == ""


def test_keygen_prints_a_fresh_64_hex_key() -> None:
    first, second = (cli("keygen", env=clean_env()).stdout for _ in range(2))
    assert re.fullmatch(r"[0-9a-f]{64}\n", first)
    assert first != second


def test_migrate_creates_the_database_and_is_idempotent(tmp_path: Path) -> None:
    env = clean_env(RUNNER_DATA_DIR=str(tmp_path / "data"))
    first = cli("migrate", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "data" / "runner.db").is_file()
    assert "migrated" in first.stderr
    again = cli("migrate", env=env, cwd=tmp_path)
    assert again.returncode == 0
    assert "up to date" in again.stderr


# -- tokens -----------------------------------------------------------------------------------


def test_an_empty_tokens_list_says_how_to_make_one(tmp_path: Path) -> None:
    env = clean_env(RUNNER_DATA_DIR=str(tmp_path / "data"))
    empty = cli("tokens", "list", env=env, cwd=tmp_path)
    assert empty.returncode == 0 and empty.stdout == "", empty.stdout
    assert "no tokens" in empty.stderr and "tokens create --user" in empty.stderr


def test_tokens_create_prints_only_the_token(server: Server) -> None:
    result = cli("tokens", "create", "--user", "alice", "--name", "laptop", env=server.env)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"cr_[A-Za-z0-9_-]+\n", result.stdout), result.stdout
    token = result.stdout.strip()
    assert token not in result.stderr
    assert "alice" in result.stderr
    assert api_get(server, token, "/api/runner/jobs").status_code == 200


def test_tokens_list_and_revoke(server: Server) -> None:
    token = cli("tokens", "create", "--user", "carol", env=server.env).stdout.strip()
    listed = cli("tokens", "list", "--json", env=server.env)
    assert listed.returncode == 0
    assert token not in listed.stdout
    (record,) = [t for t in json.loads(listed.stdout) if t["user"] == "carol"]
    assert record["role"] == "user" and record["revoked_at"] is None
    table = cli("tokens", "list", env=server.env)
    assert record["id"] in table.stdout and "carol" in table.stdout
    assert_no_trailing_blanks(table.stdout)

    revoked = cli("tokens", "revoke", record["id"], env=server.env)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in revoked.stderr
    assert api_get(server, token, "/api/runner/jobs").status_code == 401
    assert_one_error_line(cli("tokens", "revoke", str(uuid.uuid4()), env=server.env), "(not_found)")


# -- credentials ------------------------------------------------------------------------------


def test_credentials_secret_is_read_from_stdin_and_never_shown(server: Server) -> None:
    secret = f"ghp_{uuid.uuid4().hex}{uuid.uuid4().hex}"
    without_key = cli("credentials", "set", "gh", "--host", "github.com", env=server.env, input=secret + "\n")
    assert_one_error_line(without_key, "RUNNER_ENCRYPTION_KEY")

    key = cli("keygen", env=clean_env()).stdout.strip()
    env = {**server.env, "RUNNER_ENCRYPTION_KEY": key}
    outputs = [
        cli("credentials", "set", "gh", "--host", "github.com", env=env, input=secret + "\n"),
        cli("credentials", "list", env=env),
        cli("credentials", "list", "--json", env=env),
    ]
    assert all(r.returncode == 0 for r in outputs), [r.stderr for r in outputs]
    assert "gh" in outputs[1].stdout and "github.com" in outputs[1].stdout
    (listed,) = json.loads(outputs[2].stdout)
    assert {k: listed[k] for k in ("name", "host", "username")} == {
        "name": "gh",
        "host": "github.com",
        "username": "oauth2",
    }
    for result in outputs:
        assert secret not in result.stdout + result.stderr
    # Not in the database files either (the WAL included), in any plain form.
    for path in (server.root / "data").glob("runner.db*"):
        assert secret.encode() not in path.read_bytes(), path

    # Exactly one trailing newline was stripped: what git gets is the secret itself.
    settings = load_settings(env, cwd=server.root)
    runtime = Runtime.open(settings, migrate=False)
    try:
        assert runtime.credentials.get_secret("gh") == ("github.com", "oauth2", secret)
    finally:
        runtime.close()

    assert cli("credentials", "rotate", env=env).returncode == 0
    assert cli("credentials", "delete", "gh", env=env).returncode == 0
    # None left: no table of headers alone on stdout, a line on stderr that says how to store one.
    empty = cli("credentials", "list", env=env)
    assert empty.returncode == 0 and empty.stdout == "", empty.stdout
    assert "no credentials stored" in empty.stderr and "credentials set" in empty.stderr
    assert_one_error_line(cli("credentials", "delete", "gh", env=env), "(not_found)")


# -- submit and jobs --------------------------------------------------------------------------


def test_submit_prints_the_job_id_and_parses_args_as_json(server: Server, admin_token: str) -> None:
    result = submit(
        server, admin_token, "echo", "--arg", "message=hello world", "--arg", "count=3", "--arg", "loud=true"
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    uuid.UUID(job_id)
    assert "created job" in result.stderr
    job = api_get(server, admin_token, f"/api/runner/jobs/{job_id}").json()
    assert job["args"] == {"message": "hello world", "count": 3, "loud": True}
    assert job["status"] == "queued"


def test_submit_json_shape(server: Server, admin_token: str) -> None:
    result = submit(server, admin_token, "echo", "--arg", 'message="42"', "--json")
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert {"id", "repo_id", "repo", "script_key", "args", "status", "created_at", "deduplicated"} <= set(job)
    assert job["repo"] == "demo" and job["script_key"] == "echo"
    assert job["args"]["message"] == "42"  # a JSON string stays a string
    assert job["deduplicated"] is False


def test_submit_idempotency_key_replays(server: Server, admin_token: str) -> None:
    key = f"cli-{uuid.uuid4()}"
    first = submit(server, admin_token, "echo", "--arg", "message=once", "--idempotency-key", key)
    replay = submit(server, admin_token, "echo", "--arg", "message=once", "--idempotency-key", key, "--json")
    assert first.returncode == 0 and replay.returncode == 0, replay.stderr
    assert "deduplicated" in replay.stderr
    assert json.loads(replay.stdout)["id"] == first.stdout.strip()
    assert json.loads(replay.stdout)["deduplicated"] is True
    other = submit(server, admin_token, "echo", "--arg", "message=twice", "--idempotency-key", key)
    assert_one_error_line(other, "(idempotency_key_reused_with_different_payload)")
    assert other.returncode == 2
    # Blanks around the key are no part of it, as on the server: the same job, where httpx refused
    # to send the header and the CLI said the request to the runner failed (LocalProtocolError).
    padded = submit(server, admin_token, "echo", "--arg", "message=once", "--idempotency-key", f" {key} ")
    assert padded.returncode == 0, padded.stderr
    assert padded.stdout.strip() == first.stdout.strip()


def test_submit_reads_args_from_a_file_and_from_stdin(
    server: Server, admin_token: str, tmp_path: Path
) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("line one\nline [two]\n")
    from_file = submit(server, admin_token, "echo", "--arg", f"message=@{prompt}")
    from_stdin = submit(server, admin_token, "echo", "--arg", "message=-", input="from stdin\n")
    assert from_file.returncode == 0 and from_stdin.returncode == 0, from_stdin.stderr
    args = [
        api_get(server, admin_token, f"/api/runner/jobs/{r.stdout.strip()}").json()["args"]["message"]
        for r in (from_file, from_stdin)
    ]
    assert args == ["line one\nline [two]\n", "from stdin\n"]


def test_jobs_list_show_events_cancel(server: Server, admin_token: str) -> None:
    env = server.client_env(admin_token)
    job_id = submit(server, admin_token, "echo", "--arg", "message=to-cancel").stdout.strip()

    table = cli("jobs", "list", env=env)
    assert table.returncode == 0 and job_id in table.stdout
    assert_no_trailing_blanks(table.stdout)
    page = json.loads(cli("jobs", "list", "--status", "queued", "--limit", "200", "--json", env=env).stdout)
    assert job_id in [j["id"] for j in page["items"]]
    assert {"items", "total", "limit", "offset"} <= set(page)

    shown = cli("jobs", "show", job_id, env=env)
    assert shown.returncode == 0 and job_id in shown.stdout and "job_created" in shown.stdout
    assert_no_trailing_blanks(shown.stdout)
    assert json.loads(cli("jobs", "show", job_id, "--json", env=env).stdout)["id"] == job_id

    canceled = cli("jobs", "cancel", job_id, env=env)
    assert canceled.returncode == 0, canceled.stderr
    assert "canceled" in canceled.stderr
    events = json.loads(cli("jobs", "events", job_id, "--json", env=env).stdout)["items"]
    assert [e["event_type"] for e in events][:1] == ["job_created"]
    assert "job_canceled" in [e["event_type"] for e in events]
    listed_events = cli("jobs", "events", job_id, env=env).stdout
    assert "job_canceled" in listed_events
    assert_no_trailing_blanks(listed_events)
    page = json.loads(cli("jobs", "list", "--status", "canceled", "--limit", "200", "--json", env=env).stdout)
    assert job_id in [j["id"] for j in page["items"]]

    assert_one_error_line(cli("jobs", "cancel", job_id, env=env), "(invalid_transition)")


def test_jobs_logs_of_a_queued_job_says_there_is_no_log_yet(server: Server, admin_token: str) -> None:
    """`jobs logs ID` (no `-f`) of a job that has not started printed nothing at all and exited
    0: an operator could not tell an empty log from a job that never ran. A line on stderr says
    so; stdout stays the log's (empty)."""
    job_id = submit(server, admin_token, "echo", "--arg", "message=later").stdout.strip()
    result = cli("jobs", "logs", job_id, env=server.client_env(admin_token))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert f"job {job_id} is queued" in result.stderr and "-f" in result.stderr, result.stderr


def test_submit_wait_gives_up_after_wait_timeout(server: Server, admin_token: str) -> None:
    result = submit(server, admin_token, "echo", "--arg", "message=queued", "--wait", "--wait-timeout", "1")
    assert result.returncode == 5, result.stderr
    assert "still queued" in result.stderr
    assert "Traceback" not in result.stderr


# -- failures ---------------------------------------------------------------------------------


def test_unknown_repo_is_one_line(server: Server, admin_token: str) -> None:
    result = cli("submit", "nowhere", "echo", "--arg", "message=x", env=server.client_env(admin_token))
    assert_one_error_line(result, "unknown repo", "(invalid_request)")
    assert result.returncode == 2


def test_invalid_args_are_one_line(server: Server, admin_token: str) -> None:
    result = submit(server, admin_token, "echo", "--arg", "message=x", "--arg", "count=99")
    assert_one_error_line(result, "count", "(invalid_args)")
    assert_one_error_line(submit(server, admin_token, "echo", "--arg", "no-equals-sign"), "KEY=VALUE")


def test_a_number_given_to_a_string_argument_says_how_to_quote_it(server: Server, admin_token: str) -> None:
    """`--arg message=42` is the integer 42 (docs/cli.md): the server's "message: must be a string"
    alone left the user to guess why the value they typed was not one."""
    result = submit(server, admin_token, "echo", "--arg", "message=42")
    assert_one_error_line(result, "message: must be a string", "message='\"42\"'", "(invalid_args)")
    result = submit(server, admin_token, "echo", "--arg", "message=true", "--arg", "count=99")
    line = assert_one_error_line(result, "message='\"true\"'")
    assert "count='" not in line  # only the arguments the server refused as not strings


def test_bad_token_is_one_line(server: Server) -> None:
    result = cli("jobs", "list", env=server.client_env("cr_not-a-real-token"))
    assert_one_error_line(result, "(not_authenticated)")


def test_a_refused_token_says_which_setting_to_check(server: Server) -> None:
    """`error: invalid or revoked token (not_authenticated)` named neither the variable the CLI
    read it from nor how to get another one."""
    result = cli("jobs", "list", env=server.client_env("cr_not-a-real-token"))
    line = assert_one_error_line(result, "RUNNER_TOKEN", "tokens create", "(not_authenticated)")
    assert "cr_not-a-real-token" not in line


def test_blanks_around_the_token_are_ignored(server: Server, admin_token: str) -> None:
    """A token pasted with a trailing blank (or read from a file that has one): httpx refuses to
    send the header, and the CLI said `request to the runner … failed (LocalProtocolError)`, as if
    the network were at fault; a wait retried it for 30 s. The server ignores such blanks too."""
    for token in (admin_token + " ", f"\t{admin_token}  "):
        result = cli("jobs", "list", "--json", env=server.client_env(token))
        assert result.returncode == 0, result.stderr
        assert "items" in json.loads(result.stdout)


def test_missing_token_is_one_line(server: Server) -> None:
    env = {k: v for k, v in server.client_env("x").items() if k != "RUNNER_TOKEN"}
    assert_one_error_line(cli("jobs", "list", env=env), "RUNNER_TOKEN is not set")


def test_unknown_job_is_one_line(server: Server, admin_token: str) -> None:
    result = cli("jobs", "show", str(uuid.uuid4()), env=server.client_env(admin_token))
    assert_one_error_line(result, "(not_found)")


def test_a_runner_url_with_a_wrong_path_says_so(server: Server, admin_token: str) -> None:
    """RUNNER_URL naming a path the runner does not serve (a proxy's prefix where there is none)
    printed `error: Not Found (not_found)`, as if some job were missing."""
    result = cli("jobs", "list", env=server.client_env(admin_token, RUNNER_URL=server.url + "/runner"))
    assert_one_error_line(result, "/runner/api/runner/jobs", "RUNNER_URL", "(not_found)")


def test_unreachable_runner_is_one_line(server: Server, admin_token: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = cli("jobs", "list", env=server.client_env(admin_token, RUNNER_URL=url))
    line = assert_one_error_line(result, "cannot reach the runner at", url, "codex-runner serve")
    assert admin_token not in line


def test_unreachable_default_url_names_the_configured_port(server: Server, admin_token: str) -> None:
    """With `port = …` in runner.toml (or RUNNER_PORT) and no RUNNER_URL, the client commands went
    to the default http://127.0.0.1:8787 and asked "is `codex-runner serve` running?" while it ran
    on the configured port: the line now says which RUNNER_URL to set."""
    env = {**server.env, "RUNNER_TOKEN": admin_token}
    assert "RUNNER_URL" not in env and env["RUNNER_PORT"] != "8787"
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8787)) == 0:
            pytest.skip("something listens on the default port 8787 here")
    line = assert_one_error_line(cli("jobs", "list", env=env), "cannot reach the runner at")
    assert f"RUNNER_URL=http://127.0.0.1:{env['RUNNER_PORT']}" in line, line


@pytest.mark.parametrize(
    ("command", "setting", "value", "fragment"),
    [
        (["jobs", "list"], "RUNNER_PORT", "abc", "RUNNER_PORT: expected an integer"),
        (["tokens", "list"], "RUNNER_MAX_CONCURRENCY", "0", "RUNNER_MAX_CONCURRENCY: must be at least 1"),
        (["serve"], "RUNNER_ENABLED", "maybe", "RUNNER_ENABLED: expected true or false"),
        (["credentials", "list"], "RUNNER_ENCRYPTION_KEY", "short", "RUNNER_ENCRYPTION_KEY"),
        (["jobs", "list"], "RUNNER_URL", "ftp://example.com", "RUNNER_URL"),
    ],
)
def test_bad_config_value_is_one_line(
    server: Server, admin_token: str, command: list[str], setting: str, value: str, fragment: str
) -> None:
    result = cli(*command, env=server.client_env(admin_token, **{setting: value}))
    assert_one_error_line(result, fragment)
    assert result.returncode == 2


def test_a_worker_refuses_runner_enabled_false(server: Server, admin_token: str) -> None:
    """RUNNER_ENABLED=false means "this instance launches nothing", yet `worker`, which is nothing
    but a launcher, ignored it: it claimed and ran the queued jobs. It now refuses to start with
    one line naming the setting, and the queued job stays queued."""
    job_id = submit(server, admin_token, "echo", "--arg", "message=not-for-a-worker").stdout.strip()
    assert server.env["RUNNER_ENABLED"] == "false"
    result = subprocess.run(
        [CLI, "worker"],
        env={**server.env, "RUNNER_ID": "worker-disabled", "RUNNER_POLL_INTERVAL_SECONDS": "0.1"},
        cwd=server.root,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert_one_error_line(result, "RUNNER_ENABLED=false", "worker")
    assert result.returncode == 2
    assert api_get(server, admin_token, f"/api/runner/jobs/{job_id}").json()["status"] == "queued"


def test_a_serve_that_cannot_listen_starts_nothing(tmp_path: Path) -> None:
    """uvicorn runs the app's lifespan, which starts the launcher, before it binds: a `serve` whose
    port was taken (or whose host name does not resolve) claimed the queued jobs, then failed them
    as `runner_shutdown` when the bind failed, and exited 3 without a line naming the setting. The
    address is now bound first: one `error:` line naming the setting, exit 2, and the job stays
    queued."""
    srv = start_server(tmp_path / "api", enabled=False)
    try:
        token = cli_token(srv.env, srv.root, "root")
        job_id = submit(srv, token, "echo", "--arg", "message=stay-queued").stdout.strip()
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            taken = str(holder.getsockname()[1])
            for setting, value in (("RUNNER_PORT", taken), ("RUNNER_HOST", "no-such-host.invalid")):
                env = {**srv.env, "RUNNER_ENABLED": "true", "RUNNER_ID": "cannot-listen", setting: value}
                if setting == "RUNNER_HOST":
                    env["RUNNER_ALLOW_REMOTE"] = "true"
                result = cli("serve", env=env, cwd=srv.root)
                line = assert_one_error_line(result, f"{setting}={value}")
                assert result.returncode == 2, result.stderr
                assert ("already in use" if setting == "RUNNER_PORT" else "cannot resolve") in line
                job = api_get(srv, token, f"/api/runner/jobs/{job_id}").json()
                assert (job["status"], job["error_code"]) == ("queued", None), (setting, job)
    finally:
        stop(srv.proc)


def test_serve_says_serving_in_its_json_log_once_it_listens(tmp_path: Path) -> None:
    """`serve` began with a plain-text line, `codex-runner 0.1.0 serving http://…`, even with
    RUNNER_LOG_FORMAT=json (a log of JSON lines that was not), and printed it before the catalog
    and the database were even loaded, so a start that then failed had announced "serving". It is
    now a `serving` event of the service log, once the app has started and listens; a start that
    fails never says it (the test above: its only line is the error)."""
    srv = start_server(tmp_path, enabled=True, RUNNER_LOG_FORMAT="json")
    stop(srv.proc)
    lines = srv.log.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is JSON
    serving = [e for e in events if e.get("event") == "serving"]
    assert len(serving) == 1, lines
    assert serving[0]["url"] == srv.url
    assert serving[0]["version"] == __version__
    assert serving[0]["launcher"] is True
    names = [e.get("event") for e in events]
    assert names.index("launcher_started") < names.index("serving")


def test_bad_runner_toml_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "runner.toml"
    config.write_text("[runner]\nmax_concurency = 3\n")
    result = cli("tokens", "list", env=clean_env(RUNNER_CONFIG=str(config)), cwd=tmp_path)
    assert_one_error_line(result, "max_concurency", "unknown setting")


@pytest.mark.parametrize("command", [["migrate"], ["tokens", "list"], ["serve"], ["backup"]])
def test_a_data_folder_that_is_a_file_is_one_clear_line(tmp_path: Path, command: list[str]) -> None:
    """A data folder that cannot be made (a file in the way) said `error: unexpected
    FileExistsError: [Errno 17] File exists: '…'` (`backup`: `error: File exists: …`): nothing
    about which setting, or what is wrong with it."""
    (tmp_path / "data").write_text("not a folder")
    env = clean_env(RUNNER_DATA_DIR=str(tmp_path / "data"), RUNNER_PORT=str(free_port()))
    line = assert_one_error_line(cli(*command, env=env, cwd=tmp_path), str(tmp_path / "data"))
    assert "unexpected" not in line and "Errno" not in line, line
    assert "RUNNER_DATA_DIR" in line and "not a folder" in line, line


@pytest.mark.parametrize("command", [["migrate"], ["tokens", "create", "--user", "u"], ["serve"]])
def test_an_unreachable_database_is_one_clear_line(tmp_path: Path, command: list[str]) -> None:
    """`migrate`, `tokens …`, `serve`, `worker` said `error: unexpected OperationalError:
    (psycopg.OperationalError) connection failed: …`: the word "unexpected" for the commonest
    mistake there is, and no hint of the setting to check. The password is never shown."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"postgresql://runner:s3cret-pw-walk@127.0.0.1:{port}/runner"
    env = clean_env(
        RUNNER_DATA_DIR=str(tmp_path / "data"), RUNNER_DATABASE_URL=url, RUNNER_PORT=str(free_port())
    )
    line = assert_one_error_line(cli(*command, env=env, cwd=tmp_path), "RUNNER_DATABASE_URL")
    assert "unexpected" not in line and "OperationalError" not in line, line
    assert "s3cret-pw-walk" not in line and "Connection refused" in line, line


@pytest.mark.parametrize("command", [["migrate"], ["tokens", "list"]])
def test_a_sqlite_file_that_cannot_be_opened_names_the_data_folder(
    tmp_path: Path, command: list[str]
) -> None:
    """SQLite's `unable to open database file` (a runner.db of another user, or a folder in its
    place) is no server that does not run: the line says to check the file and RUNNER_DATA_DIR."""
    (tmp_path / "data" / "runner.db").mkdir(parents=True)
    env = clean_env(RUNNER_DATA_DIR=str(tmp_path / "data"))
    line = assert_one_error_line(cli(*command, env=env, cwd=tmp_path), str(tmp_path / "data" / "runner.db"))
    assert "unable to open database file" in line and "RUNNER_DATA_DIR" in line, line
    assert "check that it runs" not in line, line


# -- outcomes of submit --wait (need the launcher) ---------------------------------------------


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("cli-live"), enabled=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def live_token(live_server: Server) -> str:
    return cli("tokens", "create", "--user", "root", "--role", "admin", env=live_server.env).stdout.strip()


@pytest.mark.parametrize(
    ("script", "args", "exit_code", "status"),
    [
        ("echo", ["--arg", "message=done"], 0, "success"),
        ("fail", [], 1, "failed"),
        ("slow", [], 3, "timeout"),
    ],
)
def test_submit_wait_exit_code_follows_the_outcome(
    live_server: Server, live_token: str, script: str, args: list[str], exit_code: int, status: str
) -> None:
    result = cli("submit", "demo", script, *args, "--wait", "--json", env=live_server.client_env(live_token))
    assert result.returncode == exit_code, result.stderr
    job: dict[str, Any] = json.loads(result.stdout)
    assert job["status"] == status
    assert f"job {job['id']} {status}" in result.stderr


def test_jobs_show_prints_what_a_failed_stage_said(live_server: Server, live_token: str) -> None:
    """The stderr tail on the failed stage (SPEC §3) is often the one line that says why; `jobs
    show` printed only the stages' statuses. A control sequence in it reaches no terminal."""
    env = live_server.client_env(live_token)
    waited = cli("submit", "demo", "complain", "--wait", "--json", env=env)
    job = json.loads(waited.stdout)
    assert job["status"] == "failed"
    assert "disk quota exceeded\\x1b[2J" in waited.stderr and "\x1b" not in waited.stderr  # the outcome line
    shown = cli("jobs", "show", job["id"], env=env)
    assert shown.returncode == 0, shown.stderr
    assert "script failed:" in shown.stdout
    assert "disk quota exceeded\\x1b[2J" in shown.stdout and "\x1b" not in shown.stdout
    assert_no_trailing_blanks(shown.stdout)


def test_submit_follow_prints_the_log(live_server: Server, live_token: str) -> None:
    result = cli(
        "submit",
        "demo",
        "echo",
        "--arg",
        "message=followed",
        "--follow",
        env=live_server.client_env(live_token),
    )
    assert result.returncode == 0, result.stderr
    assert "--message followed" in result.stdout
    assert "success" in result.stderr


def test_output_is_utf8_in_an_ascii_locale(live_server: Server, live_token: str) -> None:
    """A C locale without coercion gives Python an ASCII stdout: a log, a table or JSON holding one
    non-ASCII character failed the command (`unexpected UnicodeEncodeError`). Data is written as
    UTF-8 whatever the locale: a log byte for byte as the API serves it."""
    message = "héllo 😀 中文"
    env = live_server.client_env(live_token)
    job = json.loads(
        cli("submit", "demo", "echo", "--arg", f"message={message}", "--wait", "--json", env=env).stdout
    )
    assert job["status"] == "success"
    page = api_get(live_server, live_token, f"/api/runner/jobs/{job['id']}/logs").json()
    ascii_env = {k: v for k, v in env.items() if not k.startswith(("LC_", "LANG"))}
    ascii_env.update(LC_ALL="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0")
    ascii_env.pop("PYTHONIOENCODING", None)
    for args in (["jobs", "logs", job["id"]], ["jobs", "logs", job["id"], "-f"], ["jobs", "show", job["id"]]):
        result = subprocess.run(
            [CLI, *args],
            env=ascii_env,
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, (args, result.stderr)
        assert message.encode() in result.stdout, args
        if args[1] == "logs":
            assert result.stdout == page["content"].encode()
    shown = subprocess.run(
        [CLI, "jobs", "show", job["id"], "--json"],
        env=ascii_env,
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout.decode("utf-8"))["args"]["message"] == message


# -- following over the SSE route (an in-process server with its launcher) ---------------------


class _Recorder:
    """ASGI middleware noting each request's path and Last-Event-ID header."""

    def __init__(self, app: Any, seen: list[tuple[str, str | None]]) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            last = headers.get(b"last-event-id")
            self.seen.append((scope["path"], last.decode() if last is not None else None))
        await self.app(scope, receive, send)


@dataclass
class SseRunner:
    runner: Any  # tests.integration.conftest.Runner
    seen: list[tuple[str, str | None]]

    def env(self, url: str | None = None) -> dict[str, str]:
        return clean_env(RUNNER_URL=url or self.runner.url, RUNNER_TOKEN=self.runner.token)

    def streams(self, job_id: str) -> list[str | None]:
        """The Last-Event-ID of each request made to the job's SSE route."""
        return [last for path, last in self.seen if path == f"/api/runner/jobs/{job_id}/logs/stream"]

    def full_log(self, job_id: str) -> str:
        page = self.runner.client.get(f"/api/runner/jobs/{job_id}/logs", params={"limit": 131072}).json()
        assert page["is_complete"], page
        return str(page["content"])

    def wait_for_output(self, job_id: str, text: str) -> None:
        def has_it() -> bool:
            page = self.runner.client.get(f"/api/runner/jobs/{job_id}/logs").json()
            return text in page["content"]

        assert wait_until(has_it, timeout=30), self.runner.job(job_id)


@pytest.fixture
def sse_runner(tmp_path: Path) -> Iterator[SseRunner]:
    from codex_runner.server import build_app

    from tests.helpers import serve_app
    from tests.integration.conftest import Runner, runner_settings

    runtime = Runtime.open(runner_settings(tmp_path, f"sqlite:///{tmp_path / 'runner.db'}"))
    seen: list[tuple[str, str | None]] = []
    app = build_app(runtime)
    app.add_middleware(_Recorder, seen=seen)
    token, _ = runtime.tokens.create("admin", "admin")
    try:
        with serve_app(app) as url:
            runner = Runner(url, runtime, token, tmp_path)
            try:
                yield SseRunner(runner, seen)
            finally:
                runner.client.close()
    finally:
        runtime.close()


def _follow(env: Mapping[str, str], job_id: str, *more: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [CLI, "jobs", "logs", job_id, "-f", *more],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        stdout, stderr = proc.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate(timeout=STOP_TIMEOUT)
        pytest.fail(f"the follow did not end: {stderr}")
    return proc.returncode, stdout, stderr


def test_jobs_logs_follow_streams_a_running_job_over_sse(sse_runner: SseRunner) -> None:
    job = sse_runner.runner.submit({"stdout": "first line", "sleep": "1.5", "exit": 0})
    sse_runner.wait_for_output(job["id"], "first line")
    before = len(sse_runner.seen)
    proc = _follow(sse_runner.env(), job["id"])
    assert sse_runner.runner.job(job["id"])["status"] == "running"  # followed while running
    code, stdout, stderr = _finish(proc)
    during = [path for path, _ in sse_runner.seen[before:]]

    assert code == 0, stderr
    # Every byte of the log, once: what was there before the follow and what came after it.
    assert stdout == sse_runner.full_log(job["id"])
    assert stdout.count("first line") == 1
    assert f"job {job['id']} success" in stderr
    # Through the SSE route, on one connection, and not by polling pages.
    assert sse_runner.streams(job["id"]) == [None]
    assert f"/api/runner/jobs/{job['id']}/logs" not in during


@pytest.mark.parametrize(
    ("args", "script", "cancel", "exit_code", "status"),
    [
        ({"sleep": "1", "exit": 7}, "behave", False, 1, "failed"),
        ({"sleep": "30"}, "short", False, 3, "timeout"),
        ({"sleep": "30"}, "behave", True, 4, "canceled"),
    ],
)
def test_jobs_logs_follow_exit_code_follows_the_job(
    sse_runner: SseRunner, args: dict[str, Any], script: str, cancel: bool, exit_code: int, status: str
) -> None:
    job = sse_runner.runner.submit(args, script=script)
    sse_runner.runner.wait(job["id"], {"running"})
    proc = _follow(sse_runner.env(), job["id"])
    if cancel:
        assert wait_until(lambda: bool(sse_runner.streams(job["id"])), timeout=30)
        assert sse_runner.runner.client.post(f"/api/runner/jobs/{job['id']}/cancel").status_code == 202
    code, stdout, stderr = _finish(proc)
    assert code == exit_code, stderr
    assert f"job {job['id']} {status}" in stderr
    assert stdout == sse_runner.full_log(job["id"])
    assert "Traceback" not in stderr


def _exits_141_quietly_when_its_reader_leaves(proc: subprocess.Popen[bytes]) -> None:
    """Closes the command's standard output, as a `| head` that had enough does: the command
    must end with 141 (as a shell reports SIGPIPE) and nothing on standard error."""
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    try:
        code = proc.wait(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the command did not end when its reader left")
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert code == 141, stderr
    assert "Traceback" not in stderr and "error" not in stderr, stderr


@pytest.mark.parametrize("follow", [False, True])
def test_a_reader_that_stops_early_is_not_a_failed_job(sse_runner: SseRunner, follow: bool) -> None:
    """`jobs logs ID | head`: the closed pipe ended the command with click's exit 1 — "the job
    ended failed" to a script — for a job that succeeded. Now 141, as a shell reports SIGPIPE,
    with nothing on standard error."""
    job = sse_runner.runner.wait(sse_runner.runner.submit({"bytes": 1_000_000})["id"])
    assert job["status"] == "success"
    proc = subprocess.Popen(
        [CLI, "jobs", "logs", job["id"], *(["-f"] if follow else [])],
        env=dict(sse_runner.env()),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline()
    _exits_141_quietly_when_its_reader_leaves(proc)  # the reader had enough


@pytest.mark.parametrize("command", [["doctor"], ["doctor", "--json"], ["cleanup", "--dry-run", "--json"]])
def test_an_operations_command_whose_reader_left_exits_141_quietly(
    tmp_path: Path, command: list[str]
) -> None:
    """`codex-runner doctor | head -1`: the operations commands caught the closed pipe as any
    OSError, printed `error: Broken pipe` and exited 2 ("the command failed"), where every other
    command exits 141 with nothing on standard error (docs/cli.md, exit codes)."""
    env = clean_env(RUNNER_DATA_DIR=str(tmp_path / "data"))
    assert cli("migrate", env=env, cwd=tmp_path).returncode == 0
    proc = subprocess.Popen(
        [CLI, *command],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _exits_141_quietly_when_its_reader_leaves(proc)  # before the first line


class _CuttingProxy:
    """A TCP proxy in front of the server that drops the first SSE connection in the middle of its
    second event (its first whole event received, so the client has a Last-Event-ID)."""

    def __init__(self, upstream: str) -> None:
        parts = httpx.URL(upstream)
        self.upstream = (parts.host, parts.port or 80)
        self.cut_one = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.closed.set()
        self.thread.join(timeout=10)
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream, timeout=30)
        client.settimeout(30)
        # Any request of the connection may be the stream's: the CLI reads the job's status first
        # (`logs -f` says when a job is still queued) and keeps the connection for the stream.
        cutting = threading.Event()
        with client, upstream:
            threading.Thread(target=self._requests, args=(client, upstream, cutting), daemon=True).start()
            sent = b""
            while data := self._recv(upstream):
                if cutting.is_set():
                    sent += data
                    # The head ends at the first blank line, each event at a later one.
                    ends = [m.end() for m in re.finditer(rb"\r\n\r\n", sent)]
                    if len(ends) >= 2 and len(sent) >= ends[1] + 25:
                        client.sendall(data[: len(data) - (len(sent) - ends[1] - 25)])
                        client.shutdown(socket.SHUT_RDWR)
                        return
                client.sendall(data)

    def _requests(self, client: socket.socket, upstream: socket.socket, cutting: threading.Event) -> None:
        """Forwards the client's requests; the first request for a log stream (all proxied
        connections together) is the one whose answer is cut. Marked before it is forwarded, so
        every byte counted is of its answer (HTTP/1.1 without pipelining: the answer before it
        has been read whole)."""
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if b"/logs/stream" in data.split(b"\r\n", 1)[0] and not self.cut_one.is_set():
                    self.cut_one.set()
                    cutting.set()
                upstream.sendall(data)

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:
            return b""


def test_jobs_logs_follow_reconnects_with_last_event_id(sse_runner: SseRunner) -> None:
    job = sse_runner.runner.submit({"stdout": "before the cut", "sleep": "1.5", "exit": 0})
    sse_runner.wait_for_output(job["id"], "before the cut")
    proxy = _CuttingProxy(sse_runner.runner.url)
    try:
        code, stdout, stderr = _finish(_follow(sse_runner.env(proxy.url), job["id"]))
    finally:
        proxy.close()
    assert code == 0, stderr
    assert stdout == sse_runner.full_log(job["id"])  # nothing lost, nothing twice
    # Cut once, opened again from the offset after the last whole event received.
    first, again = sse_runner.streams(job["id"])
    assert first is None and again is not None
    resumed = stdout.encode()[: int(again)]
    assert resumed.endswith(b"\n") and b"before the cut" in resumed, again
