"""A job whose runner side fails on the way still ends right: a terminal write the database
refuses, a pid record that waits for a database that is down, an internal error while the
script runs, text PostgreSQL cannot store, and secrets in what the job row shows."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa

from codex_runner.errors import StoreUnavailable
from codex_runner.execution.job import JobRun
from codex_runner.runtime import Runtime
from codex_runner.server import build_app
from codex_runner.store.jobs import JobStore, OwnerWrite

from tests.helpers import process_alive, serve_app, terminal_manifest, wait_until
from tests.integration.conftest import Runner, runner_settings

SECRET = "s3cr3t-value-0123456789abcdef"
SHAPED = "sk-proj-abcdefghijklmnopqrstuvwxyz0123"

EXTRA = f"""
[scripts.nul]
command = ["{sys.executable}", "-c", "import sys; sys.stderr.buffer.write(b'bad\\\\x00byte\\\\n'); sys.exit(3)"]

[scripts.leaky]
command = ["/bin/sh", "-c", "echo \\"auth failed for $MY_API_TOKEN\\" >&2; sleep 30"]
timeout_seconds = 1
env = ["MY_API_TOKEN"]

[scripts.shaped]
command = ["/bin/sh", "-c", "echo 'key {SHAPED}' >&2; exit 3"]
"""


def _pid(pids: Path) -> int:
    assert wait_until(lambda: pids.exists() and pids.read_text().strip() != "", timeout=15)
    return int(pids.read_text().split()[0])


def _kill(pid: int) -> None:
    if process_alive(pid):
        os.kill(pid, 9)


def test_stderr_with_a_nul_byte_still_gets_its_terminal_status(runner_factory: Callable[..., Runner]) -> None:
    # PostgreSQL refuses NUL in text: the error message and its event would fail the terminal
    # write, and the job would stay `running` until a watchdog called it stale.
    runner = runner_factory(extra_toml=EXTRA)
    done = runner.wait(runner.submit({}, script="nul")["id"], timeout=30)
    assert (done["status"], done["error_code"]) == ("failed", "script_failed"), done
    assert "\x00" not in done["error_message"] and "bad\ufffdbyte" in done["error_message"]
    events = runner.client.get(f"/api/runner/jobs/{done['id']}/events").json()["items"]
    assert any("bad\ufffdbyte" in e["message"] for e in events), events
    script = next(s for s in done["stages"] if s["name"] == "script")
    assert "\x00" not in script["error"] and "bad\ufffdbyte" in script["error"]  # the stage too


def test_a_terminal_write_the_database_refuses_ends_as_internal_error(
    runner_factory: Callable[..., Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a transient error: the write is not tried again, and the job falls back to
    # `internal_error` (its log, closed by the first attempt, takes the fallback's line too).
    real = JobStore.finish_many

    def refusing(self: JobStore, writes: Any, claim: Any = None) -> Any:
        if any(w.attempts[0].values.get("error_code") == "script_failed" for w in writes):
            raise sa.exc.DataError("UPDATE runner_jobs", {}, Exception("value refused"))
        return real(self, writes, claim)

    monkeypatch.setattr(JobStore, "finish_many", refusing)
    runner = runner_factory()
    done = runner.wait(runner.submit({"exit": 3})["id"], timeout=30)
    assert (done["status"], done["error_code"]) == ("failed", "internal_error"), done
    log = runner.client.get(f"/api/runner/jobs/{done['id']}/logs").json()["content"]
    assert "job ending: failed (script_failed)" in log and "job ending: failed (internal_error)" in log


def test_the_timeout_holds_while_the_pid_record_waits_for_the_database(
    runner_factory: Callable[..., Runner], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: Path
) -> None:
    # The pid record (a script past its first second) waits for a database that is down; the
    # deadline is still kept, and the terminal write carries the process ids instead.
    real = JobStore.update_fields

    def down(self: JobStore, *args: Any, **kwargs: Any) -> bool:
        time.sleep(0.2)
        raise StoreUnavailable("the database is not answering")

    runner = runner_factory()
    monkeypatch.setattr(JobStore, "update_fields", down)
    pids = out / "pids"
    job = runner.submit({"sleep": "60", "pids": str(pids)}, script="short")  # timeout: 1 s
    pid = _pid(pids)
    try:
        assert wait_until(lambda: not process_alive(pid), timeout=6), (
            "the 1 s timeout waited for the database"
        )
        monkeypatch.setattr(JobStore, "update_fields", real)
        done = runner.wait(job["id"], timeout=20)
        assert done["status"] == "timeout", done
        row = runner.runtime.jobs.get_row(job["id"])
        assert row is not None and row["pid"] == pid
    finally:
        _kill(pid)


def test_a_pid_record_the_database_refuses_does_not_end_the_job(
    runner_factory: Callable[..., Runner], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: Path
) -> None:
    def refused(self: JobStore, *args: Any, **kwargs: Any) -> bool:
        raise sa.exc.DataError("UPDATE runner_jobs", {}, Exception("value refused"))

    runner = runner_factory()
    monkeypatch.setattr(JobStore, "update_fields", refused)
    done = runner.wait(runner.submit({"sleep": "1.5", "pids": str(out / "pids")})["id"], timeout=30)
    assert done["status"] == "success", done
    row = runner.runtime.jobs.get_row(done["id"])
    assert row is not None and row["pid"] == int((out / "pids").read_text().split()[0])


def test_shutdown_while_the_database_is_down_leaves_no_process(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch, out: Path
) -> None:
    runtime = Runtime.open(runner_settings(tmp_path, database_url))
    token, _ = runtime.tokens.create("admin", "admin")
    cm = serve_app(build_app(runtime))
    url = cm.__enter__()
    pids = out / "pids"
    pid = 0
    try:
        r = httpx.post(
            f"{url}/api/runner/jobs",
            json={"repo": "scratch", "script_key": "behave", "args": {"sleep": "60", "pids": str(pids)}},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        pid = _pid(pids)

        def down(self: JobStore, *args: Any, **kwargs: Any) -> Any:
            time.sleep(0.2)
            raise StoreUnavailable("the database is not answering")

        monkeypatch.setattr(JobStore, "update_fields", down)
        monkeypatch.setattr(JobStore, "finish_many", down)
        time.sleep(1.5)  # past the pid record's second: it now waits for the database
        cm.__exit__(None, None, None)
        cm = None
        assert not process_alive(pid), "the job's script outlived the runner's shutdown"
    finally:
        if cm is not None:
            cm.__exit__(None, None, None)
        if pid:
            _kill(pid)
        runtime.close()


def _failing_supervision(
    monkeypatch: pytest.MonkeyPatch, alive_at_status: list[bool], started: Path | None = None
) -> None:
    """JobRun's supervision fails half a second in, while the script runs (an internal error) —
    once `started` exists, when given: on a loaded machine the script's interpreter may take
    longer than that to start; `alive_at_status` gets whether the script was alive when the
    terminal write was made."""
    real_finish = JobStore.finish_many

    async def failing(self: JobRun, proc: Any, timeout: int) -> Any:
        import asyncio

        await asyncio.sleep(0.5)
        for _ in range(500):
            if started is None or started.exists():
                break
            await asyncio.sleep(0.02)
        raise RuntimeError("supervision failed")

    def finishing(self: JobStore, writes: list[OwnerWrite], claim: Any = None) -> Any:
        for write in writes:
            pid = write.attempts[0].values.get("pid")
            if pid:
                alive_at_status.append(process_alive(pid))
        return real_finish(self, writes, claim)

    monkeypatch.setattr(JobRun, "_supervise", failing)
    monkeypatch.setattr(JobStore, "finish_many", finishing)


def test_an_internal_error_while_the_script_runs_stops_it_before_the_status(
    runner_factory: Callable[..., Runner], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: Path
) -> None:
    alive_at_status: list[bool] = []
    pids = out / "pids"
    _failing_supervision(monkeypatch, alive_at_status, started=pids)
    runner = runner_factory()
    job = runner.submit({"sleep": "60", "pids": str(pids), "grandchild": True})
    started = [int(p) for p in (pids.read_text().split() if wait_until(pids.exists) else [])]
    try:
        done = runner.wait(job["id"], timeout=30)
        assert (done["status"], done["error_code"]) == ("failed", "internal_error"), done
        assert alive_at_status == [False], "the terminal status went out with the script alive"
        assert started and not any(process_alive(p) for p in started)
        cleanup = next(s for s in done["stages"] if s["name"] == "cleanup")
        assert cleanup["status"] == "success", done["stages"]
    finally:
        for p in started:
            _kill(p)


def test_an_internal_error_in_an_in_place_job_puts_the_repo_back(
    runner_factory: Callable[..., Runner], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_supervision(monkeypatch, [])
    runner = runner_factory()
    repo = tmp_path / "repo"
    done = runner.wait(runner.submit({"sleep": "3", "touch": str(repo / "new.txt")}, repo="inplace")["id"])
    assert done["error_code"] == "internal_error", done
    git = ["git", "-C", str(repo)]
    branch = subprocess.run([*git, "branch", "--show-current"], capture_output=True, text=True, check=True)
    dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, check=True)
    assert (branch.stdout.strip(), dirty.stdout.strip()) == ("main", "")


def test_no_secret_in_a_stage_error_or_the_error_message(
    runner_factory: Callable[..., Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A passed-through secret printed before a timeout (known value), and a key shaped like one
    # (the published redaction rules), in what the job row shows: stages, error message, events.
    monkeypatch.setenv("MY_API_TOKEN", SECRET)
    runner = runner_factory(extra_toml=EXTRA)
    timed_out = runner.wait(runner.submit({}, script="leaky")["id"], timeout=30)
    assert timed_out["status"] == "timeout", timed_out
    failed = runner.wait(runner.submit({}, script="shaped")["id"], timeout=30)
    assert failed["status"] == "failed", failed
    for done in (timed_out, failed):
        events = runner.client.get(f"/api/runner/jobs/{done['id']}/events").json()
        terminal_manifest(runner.runtime.settings.runs_dir, done["id"])  # published after the status
        manifest = (runner.runtime.settings.runs_dir / done["id"] / "manifest.json").read_text()
        for text in (json.dumps(done), json.dumps(events), manifest):
            assert SECRET not in text and SHAPED not in text
    script = next(s for s in timed_out["stages"] if s["name"] == "script")
    assert "auth failed for [REDACTED]" in script["error"], script
    assert "[REDACTED" in failed["error_message"], failed


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def test_an_in_place_job_whose_cleanup_fails_keeps_its_outcome(
    runner_factory: Callable[..., Runner], tmp_path: Path
) -> None:
    # A git that still runs holds `.git/index.lock` (the test holds it open here): the cleanup's
    # reset fails. The stage says so; the job keeps the outcome of its script, not `internal_error`.
    # (A lock nobody holds, left by a killed git, is removed: test_git_workspace.py.)
    runner = runner_factory()
    lock = tmp_path / "repo" / ".git" / "index.lock"
    job = runner.submit({"touch": str(lock), "sleep": "2"}, repo="inplace")
    # The script's lock, not the one the prepare's own `git checkout` holds for a moment: the test
    # held that one open as git renamed it to `index`, so its handle was on the index and the
    # cleanup rightly removed the script's lock as held by nobody (a CI run, twice).
    assert wait_until(lambda: _text(lock) == "changed by the job\n", timeout=30)
    try:
        with lock.open("a"):
            assert _text(lock) == "changed by the job\n"
            done = runner.wait(job["id"])
        cleanup = next(s for s in done["stages"] if s["name"] == "cleanup")
        assert done["error_code"] != "internal_error", done
        assert cleanup["status"] == "failed" and "index.lock" in cleanup["error"], cleanup
    finally:
        lock.unlink(missing_ok=True)


def test_no_secret_in_the_agent_summary_or_its_failure(
    runner_factory: Callable[..., Runner], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """codex's own words go to the job row (`result.agent`, the `agent_failed` message): redacted
    like any error text, and the message redacted whole before its cut at 2,000 characters."""
    monkeypatch.setenv("MY_API_TOKEN", SECRET)
    codex = tmp_path / "bin" / "codex"
    codex.parent.mkdir(parents=True)
    pad = "x" * (2000 - len("agent failed: ") - 10)  # the secret straddles the cut
    codex.write_text(
        "#!/bin/sh\ncat >/dev/null\n"
        'printf \'{"type":"item.completed","item":{"type":"agent_message","text":"key is %s"}}\\n\' '
        '"$MY_API_TOKEN"\n'
        'printf \'{"type":"item.completed","item":{"type":"command_execution","id":"c1",'
        '"command":"curl -H x-key:%s","exit_code":0}}\\n\' "$MY_API_TOKEN"\n'
        f'printf \'{{"type":"turn.failed","error":{{"message":"{pad}%s"}}}}\\n\' "$MY_API_TOKEN"\n'
        "exit 1\n"
    )
    codex.chmod(0o755)
    extra = f'\n[scripts.fakecodex]\ncommand = ["{codex}", "exec", "--json", "-"]\nenv = ["MY_API_TOKEN"]\n'
    runner = runner_factory(extra_toml=extra)
    done = runner.wait(runner.submit({}, script="fakecodex")["id"], timeout=30)
    assert done["error_code"] == "agent_failed", done
    agent = done["result"]["agent"]
    assert agent["final_message"] == "key is [REDACTED]", agent
    assert SECRET not in json.dumps(agent) and SECRET[:10] not in done["error_message"]


def test_a_full_log_disk_costs_lines_not_the_job(
    runner_factory: Callable[..., Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/failure-modes.md: a log write that fails drops that chunk and the job goes on. The
    runner's own lines (and the close) raised instead: the job's task died and the job stayed
    `running` until a watchdog failed it."""
    import errno

    from codex_runner.logs import writer as writer_module

    real_write = writer_module.LogWriter._write

    def full_after_a_little(self: Any, data: bytes) -> None:
        if self.bytes_written + len(data) > 200:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(writer_module.LogWriter, "_write", full_after_a_little)
    runner = runner_factory()
    done = runner.wait(runner.submit({"bytes": 300_000})["id"], timeout=30)
    assert (done["status"], done["exit_code"], done["error_code"]) == ("success", 0, None), done
    failed = runner.wait(runner.submit({"exit": 3, "bytes": 10_000})["id"], timeout=30)
    assert (failed["status"], failed["error_code"]) == ("failed", "script_failed"), failed


def test_a_secret_at_the_start_of_the_kept_stderr_shows_no_part_of_itself(
    runner_factory: Callable[..., Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The raw stderr tail (16 KiB) began wherever its cut fell, inside a secret; masked, the other
    copies shrank to `[REDACTED]`, the text fit in 8 KiB and the secret's end showed whole in the
    stage's error (the API, the manifest). The tail now starts at its first whole line."""
    token = "Wq8zN3vB6xM1cL5kJ9hG2fD7sA4pO0iUtY6uHc3J"  # 40 characters, 41 bytes a line
    monkeypatch.setenv("MY_SECRET", token)
    extra = """
[scripts.many]
command = ["/bin/sh", "-c", 'i=0; while [ $i -lt 500 ]; do printf "%s\\n" "$MY_SECRET" >&2; i=$((i+1)); done; exit 1']
env = ["MY_SECRET"]
"""
    runner = runner_factory(extra_toml=extra)
    done = runner.wait(runner.submit({}, script="many")["id"], timeout=30)
    assert done["status"] == "failed" and done["error_code"] == "script_failed", done
    script = next(s for s in done["stages"] if s["name"] == "script")
    assert script["error"] and script["error"].startswith("[REDACTED")
    terminal_manifest(runner.runtime.settings.runs_dir, done["id"])  # published after the status
    manifest = (runner.runtime.settings.runs_dir / done["id"] / "manifest.json").read_text()
    shown = json.dumps([script["error"], done["error_message"]]) + manifest
    for piece in (token[-10:], token[:10], token[15:25]):
        assert piece not in shown


def test_a_secret_across_the_stderr_tails_cut_shows_no_part_of_itself(
    runner_factory: Callable[..., Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last 8 KiB of stderr was cut raw, then redacted: a known secret straddling the cut no
    longer matched, and its end showed in the stage's error and the error message."""
    token = "PvR2mKd9LsT4nBc7HfGa8xQ1wE5tY3uI"
    monkeypatch.setenv("MY_API_TOKEN", token)
    extra = """
[scripts.leak]
command = ["/bin/sh", "-c", "printf '%0100d' 0 >&2; printf '%s' \\"$MY_API_TOKEN\\" >&2; printf '%08172d' 0 >&2; exit 1"]
env = ["MY_API_TOKEN"]
"""
    runner = runner_factory(extra_toml=extra)
    done = runner.wait(runner.submit({}, script="leak")["id"], timeout=30)
    assert done["status"] == "failed" and done["error_code"] == "script_failed", done
    script = next(s for s in done["stages"] if s["name"] == "script")
    shown = json.dumps([script["error"], done["error_message"]])
    for piece in (token[-12:], token[:12], token[10:22]):
        assert piece not in shown
    assert len(script["error"].encode()) <= 8192


def test_secrets_of_variables_not_named_like_keys_and_their_encodings_stay_out_of_the_log(
    runner_factory: Callable[..., Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `DB_PASS` and a DSN were no known secrets (only KEY, TOKEN, SECRET, PASSWORD, PASSWD,
    CREDENTIAL and AUTH names were), a secret printed as `urllib.parse.quote` writes it or as
    `base64` wraps it went through, and a value read from a file with its newline was masked only
    with the newline: all reached the log file on disk in clear."""
    password = "Vq8r+T2wL/m9Zx4Kc"
    dsn = "https://a1b2c3d4e5f6@o1.ingest.example.io/42"
    long_token = "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123"
    monkeypatch.setenv("DB_PASS", password)
    monkeypatch.setenv("SENTRY_DSN", dsn)
    monkeypatch.setenv("MY_API_TOKEN", long_token + "\n")
    printer = (
        "import base64, os, urllib.parse as u; e = os.environ; "
        "print(e['DB_PASS'], u.quote(e['DB_PASS']), e['SENTRY_DSN']); "
        "print(base64.encodebytes(e['MY_API_TOKEN'].strip().encode()).decode()); "
        "print(e['MY_API_TOKEN'].strip(), flush=True)"
    )
    extra = f"""
[scripts.leaky]
command = ["{sys.executable}", "-c", "{printer}"]
env = ["DB_PASS", "SENTRY_DSN", "MY_API_TOKEN"]
"""
    runner = runner_factory(extra_toml=extra)
    done = runner.wait(runner.submit({}, script="leaky")["id"], timeout=30)
    assert done["status"] == "success", done
    text = (runner.runtime.settings.log_dir / f"{done['id']}.log").read_text()
    wrapped = base64.encodebytes(long_token.encode()).decode().splitlines()
    assert text.count("[REDACTED]") >= 5, text
    for leak in (password, quote(password), dsn, long_token, *wrapped):
        assert leak not in text, text


def test_a_repo_whose_credential_is_not_stored_fails_its_prepare_saying_so(
    runner_factory: Callable[..., Runner], tmp_path: Path
) -> None:
    """A repo naming a credential nobody stored (a typo, a `credentials delete`) ended its jobs as
    `internal_error`, "internal runner error", with no line in the log: neither the job's user nor
    the operator could tell what to fix."""
    extra = (
        f'\n[repos.nocred]\nsource = "{tmp_path / "repo"}"\nworkspace = "scratch"\ncredential = "github"\n'
    )
    runner = runner_factory(extra_toml=extra)
    done = runner.wait(runner.submit({}, repo="nocred")["id"], timeout=30)
    assert (done["status"], done["error_code"]) == ("failed", "prepare_failed"), done
    assert "credential 'github' not found" in done["error_message"]
    prepare = next(s for s in done["stages"] if s["name"] == "prepare")
    assert prepare["status"] == "failed" and "credential 'github' not found" in prepare["error"]
    log = runner.client.get(f"/api/runner/jobs/{done['id']}/logs").json()["content"]
    assert f"job {done['id']} started" in log and "credential 'github' not found" in log


def test_a_credential_the_runner_cannot_decrypt_fails_the_prepare_saying_so(
    runner_factory: Callable[..., Runner], tmp_path: Path
) -> None:
    """Stored under a key this runner does not have (none here): named, with what to check. The
    key-less store's own words ("run `codex-runner keygen`") would have the operator make a new
    key, which decrypts nothing stored."""
    from codex_runner.secrets import generate_key, parse_key
    from codex_runner.store.admin import CredentialStore

    extra = (
        f'\n[repos.keyless]\nsource = "{tmp_path / "repo"}"\nworkspace = "scratch"\ncredential = "github"\n'
    )
    runner = runner_factory(extra_toml=extra)
    CredentialStore(runner.runtime.engine, parse_key(generate_key())).set(
        "github", "github.com", "oauth2", SECRET
    )
    done = runner.wait(runner.submit({}, repo="keyless")["id"], timeout=30)
    assert (done["status"], done["error_code"]) == ("failed", "prepare_failed"), done
    assert "credential 'github' cannot be decrypted" in done["error_message"], done["error_message"]
    assert "RUNNER_ENCRYPTION_KEY" in done["error_message"] and "keygen" not in done["error_message"]
