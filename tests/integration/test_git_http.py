"""Clone and push through a real authenticated HTTP git server on 127.0.0.1, wrong credentials failing
fast, and the leak test: a recognisable token appears in no file and no process command line."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from git_http_server import make_bare_repo, serve_git_http

from codex_runner.config import Settings
from codex_runner.execution.workspace import (
    GitCredential,
    GitError,
    Workspace,
    cleanup_workspace,
    commit_changes,
    prepare_workspace,
    push_branch,
)
from codex_runner.secrets import secret_forms

pytestmark = pytest.mark.timeout(60)

USER = "x-access-token"
TOKEN = "ghp_LEAKCANARY0123456789abcdefABCDEF0123"
WRONG = "ghp_LEAKCANARYWRONG9876543210zyxwvuZYXWV"


@dataclass(frozen=True)
class Repo:
    id: str
    source: str
    source_type: str = "git_url"
    branch: str | None = "main"
    workspace: str = "clone"
    push: bool = True


@dataclass(frozen=True)
class LocalRepo:
    id: str
    source: str
    source_type: str = "local_path"
    branch: str | None = "main"
    workspace: str = "in_place"
    push: bool = True


def git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


@dataclass
class Server:
    url: str
    bare: Path
    host: str


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    bare = make_bare_repo(root / "widgets.git")
    seed = tmp_path / "seed"
    git("init", "-q", "-b", "main", str(seed))
    (seed / "README.md").write_text("hello\n")
    git("add", "-A", cwd=seed)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=seed)
    git("push", "-q", str(bare), "main", cwd=seed)
    with serve_git_http(root, USER, TOKEN) as base:
        yield Server(f"{base}/widgets.git", bare, base.removeprefix("http://"))


def settings_for(tmp: Path) -> Settings:
    return Settings(data_dir=tmp / "data", workspace_dir=tmp / "data" / "workspaces")


def commit(ws: Workspace) -> None:
    commit_changes(ws, message=f"codex.exec: job {ws.job_id}", author_name="Runner", author_email="r@x.io")


def test_clone_and_push_with_a_stored_credential(tmp_path: Path, server: Server) -> None:
    settings = settings_for(tmp_path)
    repo = Repo("widgets", server.url)
    cred = GitCredential(host=server.host, username=USER, secret=TOKEN)
    ws = prepare_workspace(repo, "a1a1a1a1-1", settings, cred)
    assert (ws.path / "README.md").read_text() == "hello\n"
    (ws.path / "change.txt").write_text("from the job\n")
    commit(ws)
    push_branch(ws, repo, cred)
    assert git("rev-parse", "refs/heads/runner/a1a1a1a1", cwd=server.bare) == git(
        "rev-parse", "HEAD", cwd=ws.path
    )
    cleanup_workspace(ws, repo, settings, failed=False)

    # Host-only credentials ("127.0.0.1", no port) match too, as git's own helpers do.
    ws2 = prepare_workspace(repo, "b2b2b2b2-2", settings, GitCredential("127.0.0.1", USER, TOKEN))
    cleanup_workspace(ws2, repo, settings, failed=False)


def test_concurrent_first_jobs_share_one_mirror(tmp_path: Path, server: Server) -> None:
    settings = settings_for(tmp_path)
    repo = Repo("widgets", server.url)
    cred = GitCredential(server.host, USER, TOKEN)
    spaces: list[Workspace] = []
    errors: list[BaseException] = []

    def job(job_id: str) -> None:
        try:
            spaces.append(prepare_workspace(repo, job_id, settings, cred))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(f"{i}{i}{i}{i}{i}{i}{i}{i}-c",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(spaces) == 4
    assert len({ws.store for ws in spaces}) == 1
    assert len(list(settings.mirrors_dir.iterdir())) == 1  # no temporary mirror left behind
    for ws in spaces:
        cleanup_workspace(ws, repo, settings, failed=False)


@pytest.mark.parametrize(
    "cred",
    [
        GitCredential("127.0.0.1", USER, WRONG),
        None,
        GitCredential("github.com", USER, TOKEN),  # another host's credential is never offered
    ],
    ids=["wrong-token", "no-credential", "other-host"],
)
def test_bad_credentials_fail_fast_on_clone(
    tmp_path: Path, server: Server, cred: GitCredential | None
) -> None:
    settings = settings_for(tmp_path)
    started = time.monotonic()
    with pytest.raises(GitError) as err:
        prepare_workspace(Repo("widgets", server.url), "c3c3c3c3-3", settings, cred)
    assert time.monotonic() - started < 10
    assert err.value.code == "clone_failed"
    assert "git fetch failed" in err.value.message
    assert not list(settings.mirrors_dir.iterdir())  # no half-made mirror


def test_wrong_token_fails_fast_on_push(tmp_path: Path, server: Server) -> None:
    settings = settings_for(tmp_path)
    repo = Repo("widgets", server.url)
    ws = prepare_workspace(repo, "d4d4d4d4-4", settings, GitCredential(server.host, USER, TOKEN))
    (ws.path / "x.txt").write_text("x\n")
    commit(ws)
    started = time.monotonic()
    with pytest.raises(GitError) as err:
        push_branch(ws, repo, GitCredential(server.host, USER, WRONG))
    assert time.monotonic() - started < 10
    assert err.value.code == "push_failed" and "Authentication failed" in err.value.message
    cleanup_workspace(ws, repo, settings, failed=True)


class CmdlineSampler:
    """Polls every process's command line and environment while git runs, looking for any form
    of the secrets: both are readable to every process of the runner's user, a job's included."""

    def __init__(self, needles: list[bytes]) -> None:
        self.needles = needles
        self.git_seen = 0
        self.leaks: list[bytes] = []
        self.environ_leaks: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CmdlineSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        own = str(os.getpid())
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or pid == own:
                    continue
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"git" in cmdline:
                    self.git_seen += 1
                if any(n in cmdline for n in self.needles):
                    self.leaks.append(cmdline)
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                if any(n in environ for n in self.needles):
                    self.environ_leaks.append(cmdline)


def _files_containing(root: Path, needles: list[bytes]) -> list[Path]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(n in data for n in needles):
                hits.append(path)
    return hits


def test_the_token_leaks_nowhere(tmp_path: Path, server: Server) -> None:
    settings = settings_for(tmp_path)
    forms = [f.encode() for secret in (TOKEN, WRONG) for f in secret_forms(secret)]
    repo = Repo("widgets", server.url)
    cred = GitCredential(server.host, USER, TOKEN)
    assert TOKEN not in repr(cred)
    messages: list[str] = []
    with CmdlineSampler(forms) as sampler:
        # Control: the sampler does see a secret in a command line when there is one.
        subprocess.run(["sh", "-c", "sleep 0.3", "control", TOKEN], check=True)
        subprocess.run(["sleep", "0.3"], env={"CONTROL": TOKEN}, check=True)
        assert sampler.leaks and sampler.environ_leaks
        sampler.leaks.clear()
        sampler.environ_leaks.clear()
        first = prepare_workspace(repo, "e5e5e5e5-5", settings, cred)  # creates the mirror
        second = prepare_workspace(repo, "f6f6f6f6-6", settings, cred)  # fetches into it
        (first.path / "new.txt").write_text("new\n")
        commit(first)
        push_branch(first, repo, cred)
        for bad in (GitCredential(server.host, USER, WRONG), None):
            with pytest.raises(GitError) as err:
                push_branch(first, repo, bad)
            messages.append(err.value.message)
        with pytest.raises(GitError) as err:
            prepare_workspace(repo, "a7a7a7a7-7", settings, GitCredential(server.host, USER, WRONG))
        messages.append(err.value.message)
        assert not _files_containing(settings.data_dir, forms)
        assert not _files_containing(first.path / ".git", forms)
        assert "@" not in git("config", "--get", "remote.origin.url", cwd=first.path)
        cleanup_workspace(first, repo, settings, failed=False)
        cleanup_workspace(second, repo, settings, failed=True)
    assert sampler.git_seen > 0, "the sampler never saw a git process"
    assert not sampler.leaks
    # The credential reached git's helper through a memory file's descriptor: no git process
    # (fetch, push, remote-https, the helper) had it in its environment.
    assert not sampler.environ_leaks, sampler.environ_leaks[:3]
    assert not _files_containing(settings.data_dir, forms)
    assert all(TOKEN not in m and WRONG not in m for m in messages)


def test_a_token_written_as_the_urls_user_name_reaches_no_command_line(
    tmp_path: Path, server: Server
) -> None:
    """`https://<token>@host/…` is how tokens are often written into a URL (GitHub takes one as the
    user name), in the catalog or in a local repo's `origin`. The runner gave git the URL as it
    was: the token stood in the command line of every fetch and push (`/proc/<pid>/cmdline`,
    readable by any local user), in the clone's `.git/config`, and in the error of a push with no
    stored credential ("could not read Password for 'http://<token>@…'"). Over http(s) the user
    name now stays out: the stored credential supplies one."""
    in_url = "userinfo-canary-0123456789"
    url = server.url.replace("://", f"://{in_url}@", 1)
    settings = settings_for(tmp_path)
    cred = GitCredential(server.host, USER, TOKEN)
    local = tmp_path / "local"
    git("clone", "-q", str(server.bare), str(local))
    git("remote", "set-url", "origin", url, cwd=local)
    messages: list[str] = []
    with CmdlineSampler([in_url.encode()]) as sampler:
        repo = Repo("widgets", url, branch=None)  # the default branch comes from `ls-remote`
        ws = prepare_workspace(repo, "b8b8b8b8-8", settings, cred)
        (ws.path / "new.txt").write_text("new\n")
        commit(ws)
        push_branch(ws, repo, cred)
        assert not _files_containing(ws.path / ".git", [in_url.encode()])
        cleanup_workspace(ws, repo, settings, failed=False)
        in_place = LocalRepo("local", str(local))
        ws = prepare_workspace(in_place, "c9c9c9c9-9", settings)
        (local / "more.txt").write_text("more\n")
        commit(ws)
        with pytest.raises(GitError) as err:
            push_branch(ws, in_place, None)
        messages.append(err.value.message)
        push_branch(ws, in_place, cred)
        cleanup_workspace(ws, in_place, settings, failed=False)
    assert sampler.git_seen > 0
    assert not sampler.leaks
    assert all(in_url not in m for m in messages), messages
    assert git("rev-parse", "--verify", "-q", "refs/heads/runner/c9c9c9c9", cwd=server.bare)
