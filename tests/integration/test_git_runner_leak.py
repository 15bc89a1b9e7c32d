"""Full runs through the runner against an authenticated HTTP git server: clone and push with a
stored credential, a push the server refuses, and a token that appears nowhere (issue 4)."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from git_http_server import make_bare_repo, serve_git_http

from codex_runner.execution.recovery import PUSH_CUT_SHORT, ended_stages, recovered_message
from codex_runner.secrets import generate_key, secret_forms

USER = "runner"
TOKEN = "ghp_LEAKCANARY" + secrets.token_hex(12)

REMOTE_TOML = """
[repos.remote]
source = "{base}/app.git"
workspace = "clone"
push = true
credential = "gitsrv"

[repos.locked]
source = "{base}/locked.git"
workspace = "clone"
push = true
credential = "gitsrv"

[repos.slow]
source = "{base}/slow.git"
workspace = "clone"
push = true
credential = "gitsrv"
"""


def _seed(bare: Path, tmp: Path) -> None:
    work = tmp / f"seed-{bare.name}"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "README.md").write_text("hello\n")
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@e"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    subprocess.run([*git, "push", "-q", str(bare), "main"], check=True)


@pytest.fixture
def git_server(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "srv"
    root.mkdir()
    for name in ("app.git", "locked.git", "slow.git"):
        _seed(make_bare_repo(root / name), tmp_path)
    hook = root / "locked.git" / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'pushes are frozen here' >&2\nexit 1\n")
    hook.chmod(0o755)
    # slow.git holds every push until the test lets it go (60 s at most): `pushing` says one is in.
    hook = root / "slow.git" / "hooks" / "pre-receive"
    hook.write_text(
        f"#!/bin/sh\ncat >/dev/null\ntouch {tmp_path}/pushing\ni=0\n"
        f"while [ ! -e {tmp_path}/release ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n"
    )
    hook.chmod(0o755)
    with serve_git_http(root, USER, TOKEN) as base:
        yield base


class CmdlineSampler:
    """Reads every process's command line while the jobs run."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    with contextlib.suppress(OSError):
                        self.seen.append(Path(f"/proc/{pid}/cmdline").read_bytes())
            time.sleep(0.005)


def _all_files(root: Path) -> Iterator[Path]:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path


def test_clone_push_and_failing_push_leak_nothing(
    runner_factory: Any, git_server: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    runner = runner_factory(
        extra_toml=REMOTE_TOML.format(base=git_server),
        RUNNER_ENCRYPTION_KEY=generate_key(),
        RUNNER_ALLOWED_GIT_URL_PREFIXES=git_server,
    )
    runner.runtime.credentials.set("gitsrv", "127.0.0.1", USER, TOKEN)
    sampler = CmdlineSampler()
    sampler.thread.start()
    try:
        ok = runner.wait(
            runner.submit({"touch": "changed.txt", "stdout": "working"}, repo="remote")["id"], timeout=60
        )
        refused = runner.wait(runner.submit({"touch": "other.txt"}, repo="locked")["id"], timeout=60)
    finally:
        sampler.stop.set()
        sampler.thread.join(timeout=10)

    assert ok["status"] == "success", ok
    assert ok["result"]["pushed"] is True and ok["result"]["commit"]
    assert ok["result"]["files_changed"] == 1 and ok["result"]["lines_added"] == 1
    ok_log = runner.client.get(f"/api/runner/jobs/{ok['id']}/logs").json()["content"]
    assert ": 1 file, +1 -0" in ok_log, ok_log  # not "1 files"
    branch = ok["result"]["branch"]
    assert branch == f"runner/{ok['id'][:8]}"
    shown = subprocess.run(
        ["git", "--git-dir", str(tmp_path / "srv" / "app.git"), "show", "--stat", branch],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "changed.txt" in shown
    assert refused["status"] == "failed" and refused["error_code"] == "push_failed", refused
    assert "frozen" in refused["error_message"]

    forms = [f.encode() for f in secret_forms(TOKEN)]
    assert sampler.seen, "the sampler read no command line"
    for cmdline in sampler.seen:
        assert not any(f in cmdline for f in forms)
    data_dir = runner.runtime.settings.data_dir
    for path in _all_files(data_dir):
        if path.suffix in {".db", ".db-wal", ".db-shm"} or path.name.startswith("runner.db"):
            continue  # the database holds the credential, encrypted: checked below
        blob = path.read_bytes()
        assert not any(f in blob for f in forms), path
    db_blob = b"".join(p.read_bytes() for p in _all_files(tmp_path) if p.name.startswith("runner.db"))
    assert not any(f in db_blob for f in forms)
    for job in (ok, refused):
        full = runner.client.get(f"/api/runner/jobs/{job['id']}").text
        events = runner.client.get(f"/api/runner/jobs/{job['id']}/events").text
        log = runner.client.get(f"/api/runner/jobs/{job['id']}/logs", params={"limit": 131072}).text
        for text in (full, events, log):
            assert not any(f.decode() in text for f in forms)
    # The server's clones of the workspace's .git are gone with cleanup; the bare repos' config
    # and the mirror's config hold no credential either.
    for cfg in [*(tmp_path / "srv").rglob("config"), *data_dir.rglob("config")]:
        assert not any(f in cfg.read_bytes() for f in forms), cfg
    out, err = capfd.readouterr()
    assert not any(f.decode() in out + err for f in forms)


def test_a_push_under_way_stands_in_the_row_so_a_recovery_says_it_may_have_landed(
    runner_factory: Any, git_server: str, tmp_path: Path
) -> None:
    """An instance that dies during a push leaves a job that a watchdog (on another host, which
    reads the stages from the row) or its restart fails. The row said the push was still `pending`
    (written before the push began), so the recovered job said `skipped` for a push the remote may
    well have taken; and its message said nothing about the branch."""
    runner = runner_factory(
        extra_toml=REMOTE_TOML.format(base=git_server),
        RUNNER_ENCRYPTION_KEY=generate_key(),
        RUNNER_ALLOWED_GIT_URL_PREFIXES=git_server,
    )
    runner.runtime.credentials.set("gitsrv", "127.0.0.1", USER, TOKEN)
    job = runner.submit({"touch": "changed.txt"}, repo="slow")["id"]
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "pushing").exists():
            assert time.monotonic() < deadline, runner.runtime.jobs.get_row(job)
            time.sleep(0.05)
        row = runner.runtime.jobs.get_row(job)
        assert row is not None
        assert {s["name"]: s["status"] for s in row["stages"]}["push"] == "running", row["stages"]
        # What another host's watchdog makes of that row: no run folder there to read.
        elsewhere = replace(runner.runtime.settings, data_dir=tmp_path / "elsewhere")
        ended = ended_stages(row, elsewhere)
        stages = {s["name"]: s for s in ended}
        assert stages["commit"]["status"] == "success"
        assert (stages["push"]["status"], stages["push"]["error"]) == ("failed", PUSH_CUT_SHORT)
        message = recovered_message("the runner restarted while this job ran", row, ended)
        assert message.startswith("the runner restarted while this job ran, during the push of ")
        assert f"runner/{job[:8]}" in message
    finally:
        (tmp_path / "release").touch()
    done = runner.wait(job, timeout=60)
    assert done["status"] == "success" and done["result"]["pushed"] is True, done
    assert {s["name"]: s["status"] for s in done["stages"]}["push"] == "success"
