"""What an agent that writes in its workspace (and, in worktree and in_place mode, in the repo's
shared `.git`) can no longer make the runner's own, unsandboxed git do: run a program, write
outside the workspace, push where the allowlists do not reach, or push a commit that names
nothing. Each test failed on the build before its fix."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from codex_runner.execution.workspace import (
    GitError,
    cleanup_workspace,
    prepare_workspace,
    push_branch,
)

from tests.integration.test_git_workspace import Repo, commit, git, make_repo, settings_for

pytestmark = pytest.mark.timeout(60)


def test_a_local_push_target_runs_no_program_from_its_config(tmp_path: Path) -> None:
    """An in_place agent made a bare repo inside the repo's own `.git` (inside the allowlist,
    invisible to `status`), gave it alternates and a `core.alternateRefsCommand`, and named it as
    origin: the runner's fetch into it ran that command through the shell, as the runner."""
    local = make_repo(tmp_path / "repo")
    evil = local / ".git" / "x.git"
    git("init", "-q", "--bare", str(evil))
    (evil / "objects" / "info" / "alternates").write_text(f"{local / '.git' / 'objects'}\n")
    marker = tmp_path / "PWNED"
    git("config", "-f", str(evil / "config"), "core.alternateRefsCommand", f"id > {marker}; echo")
    git("remote", "add", "origin", str(evil), cwd=local)
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place")
    ws = prepare_workspace(repo, "61616161-a", settings)
    (local / "new.txt").write_text("x\n")
    result = commit(ws)
    push_branch(ws, repo, None)
    assert not marker.exists()
    assert git("rev-parse", "refs/heads/runner/61616161", cwd=evil) == result.commit
    cleanup_workspace(ws, repo, settings, failed=False)


@pytest.mark.parametrize("how", ["gitfile", "symlink"])
def test_a_local_push_target_cannot_send_the_push_into_another_repository(tmp_path: Path, how: str) -> None:
    """The allowlists judge the push target's path; a `.git` file (or symlink) in it named a
    repository elsewhere, and the runner's ref update landed there."""
    local = make_repo(tmp_path / "repo")
    outside = tmp_path / "outside.git"
    git("init", "-q", "--bare", str(outside))
    target = local / ".git" / "y"
    target.mkdir()
    if how == "gitfile":
        (target / ".git").write_text(f"gitdir: {outside}\n")
    else:
        (target / ".git").symlink_to(outside)
    git("remote", "add", "origin", str(target), cwd=local)
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place")
    ws = prepare_workspace(repo, "62626262-a", settings)
    (local / "new.txt").write_text("x\n")
    commit(ws)
    with pytest.raises(GitError) as err:
        push_branch(ws, repo, None)
    assert err.value.code == "push_failed" and "another repository" in err.value.message
    assert git("for-each-ref", cwd=outside) == ""
    cleanup_workspace(ws, repo, settings, failed=False)


def test_a_repository_around_the_services_folder_never_sees_the_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ls-remote` (the default branch of a URL repo) ran with no repository and the service's
    working directory: git found the repo that folder is in and used its config, which an agent
    can write when the runner is started inside a repo it also runs in_place. Its `http.proxy`
    received the credential."""
    import http.server
    import socketserver
    import threading

    from codex_runner.execution.workspace import GitCredential

    from tests.integration.git_http_server import make_bare_repo, serve_git_http

    seen: list[tuple[str, str | None]] = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="x"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    proxy = socketserver.TCPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        root = tmp_path / "srv"
        root.mkdir()
        make_bare_repo(root / "widgets.git")
        seed = make_repo(tmp_path / "seed")
        git("push", "-q", str(root / "widgets.git"), "main", cwd=seed)
        around = make_repo(tmp_path / "around")
        git("config", "http.proxy", f"http://127.0.0.1:{proxy.server_address[1]}", cwd=around)
        monkeypatch.chdir(around)
        settings = settings_for(tmp_path)
        with serve_git_http(root, "runner", "S3CRET-TOKEN-123") as base:
            credential = GitCredential(
                host=base.split("//", 1)[1], username="runner", secret="S3CRET-TOKEN-123"
            )
            repo = Repo(
                "widgets", f"{base}/widgets.git", source_type="git_url", branch=None, workspace="clone"
            )
            ws = prepare_workspace(repo, "63636363-a", settings, credential)
            assert ws.base_branch == "main"
            cleanup_workspace(ws, repo, settings, failed=False)
        assert seen == []
    finally:
        proxy.shutdown()
        proxy.server_close()


@pytest.mark.parametrize(
    "link", ["COMMIT_EDITMSG", "logs/HEAD", "logs/refs/heads/runner/64646464", "objects/ab"]
)
def test_the_runners_commit_writes_nothing_through_a_symlink_in_git(tmp_path: Path, link: str) -> None:
    """A clone's `.git` is the agent's to write: a symlink at COMMIT_EDITMSG (opened for writing),
    at a reflog (appended to) or at a folder of loose objects made the runner's commit write into a
    file or folder outside the workspace. The commit stage refuses instead."""
    local = make_repo(tmp_path / "repo")
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("the operator's data\n")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="clone", push=False)
    ws = prepare_workspace(repo, "64646464-a", settings)
    assert ws.git_dir is not None
    target = ws.git_dir / link
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    target.symlink_to(outside if link.startswith("objects/") else victim)
    (ws.path / "change.txt").write_text("x\n")
    with pytest.raises(GitError) as err:
        commit(ws)
    assert err.value.code == "commit_failed" and "symbolic link" in err.value.message
    assert victim.read_text() == "the operator's data\n"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    cleanup_workspace(ws, repo, settings, failed=False)


def test_an_in_place_repo_behind_a_symlinked_folder_is_still_guarded(tmp_path: Path) -> None:
    """The git dir's identity was recorded only when `.git` sat in the workspace path as given; an
    in_place repo configured through a symlinked folder skipped it, and an agent that replaced
    `.git` with a link to another checkout had the runner commit into that one."""
    real = make_repo(tmp_path / "real" / "repo")
    (tmp_path / "srv").symlink_to(tmp_path / "real")
    other = tmp_path / "other"
    git("clone", "-q", str(real), str(other))
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(tmp_path / "srv" / "repo"), workspace="in_place", push=False)
    ws = prepare_workspace(repo, "65656565-a", settings)
    assert ws.git_dir_id is not None
    import shutil

    shutil.rmtree(real / ".git")
    (real / ".git").symlink_to(other / ".git")  # the agent
    (real / "agent.txt").write_text("agent\n")
    with pytest.raises(GitError) as err:
        commit(ws)
    assert err.value.code == "commit_failed"
    assert "runner/65656565" not in git("for-each-ref", "--format=%(refname)", cwd=other)


@pytest.mark.parametrize("nesting", ["linked", "linked twice"])
def test_a_nested_repositorys_filter_driver_never_runs_in_the_runners_commit(
    tmp_path: Path, nesting: str
) -> None:
    """git's `add` and `commit` run `git status` inside every repository the index links to, and
    that command read the nested repository's config, the agent's: a filter driver named there
    (with `* filter=x` in its info/attributes) ran as the runner, in every workspace mode. Also
    for a repository linked from inside the linked one."""
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="clone", push=False)
    ws = prepare_workspace(repo, "66666666-a", settings)
    marker = tmp_path / "PWNED"
    ident = ("-c", "user.name=a", "-c", "user.email=a@a")
    sub = make_repo(ws.path / "sub", {"f.txt": "x\n"})
    evil = sub
    if nesting == "linked twice":
        evil = make_repo(sub / "deeper", {"g.txt": "y\n"})
        (sub / ".gitmodules").write_text('[submodule "deeper"]\n\tpath = deeper\n\turl = ./deeper\n')
        git("add", "-A", cwd=sub)
        git(*ident, "commit", "-qm", "link", cwd=sub)
    git("config", "filter.x.clean", f"sh -c 'touch {marker}; cat'", cwd=evil)
    (evil / ".git" / "info").mkdir(exist_ok=True)
    (evil / ".git" / "info" / "attributes").write_text("* filter=x\n")
    (ws.path / ".gitmodules").write_text('[submodule "sub"]\n\tpath = sub\n\turl = ./sub\n')
    git("add", "-A", cwd=ws.path)
    git(*ident, "commit", "-qm", "agent", cwd=ws.path)
    marker.unlink(missing_ok=True)
    import os
    import time

    time.sleep(1.1)  # the files' stat data changes: git must look at their contents again
    for path in evil.iterdir():
        if path.is_file():
            os.utime(path)
    (ws.path / "more.txt").write_text("more\n")
    result = commit(ws)
    assert result.commit is not None
    assert not marker.exists()
    cleanup_workspace(ws, repo, settings, failed=False)


def test_a_repository_the_agent_committed_itself_is_refused_too(tmp_path: Path) -> None:
    """A folder the agent made a repository of its own is refused when the runner stages it; when
    the agent committed it itself, the link went out as a gitlink to a commit that exists nowhere."""
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="clone", push=False)
    ws = prepare_workspace(repo, "67676767-a", settings)
    make_repo(ws.path / "app", {"index.js": "console.log(1)\n"})
    git("add", "-A", cwd=ws.path)
    git("-c", "user.name=a", "-c", "user.email=a@a", "commit", "-qm", "scaffold", cwd=ws.path)
    with pytest.raises(GitError) as err:
        commit(ws)
    assert err.value.code == "commit_failed" and "app" in err.value.message
    cleanup_workspace(ws, repo, settings, failed=False)


def test_in_place_never_overwrites_the_operators_ignored_files(tmp_path: Path) -> None:
    """The repo's `branch` tracks a file that the checked-out branch ignores (the operator's local
    settings): the checkout to the job branch overwrote it, and the switch back at cleanup deleted
    it. The job now fails at set-up and the file is as it was."""
    local = make_repo(tmp_path / "repo", {"README.md": "hi\n", ".gitignore": "local.cfg\n"})
    git("checkout", "-q", "-b", "release", cwd=local)
    (local / ".gitignore").write_text("")
    (local / "local.cfg").write_text("tracked default\n")
    git("add", "-A", cwd=local)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "release", cwd=local)
    git("checkout", "-q", "main", cwd=local)
    (local / "local.cfg").write_text("the operator's own settings\n")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), branch="release", workspace="in_place", push=False)
    with pytest.raises(GitError) as err:
        prepare_workspace(repo, "68686868-a", settings)
    assert err.value.code == "branch_failed" and "would be overwritten" in err.value.message
    assert (local / "local.cfg").read_text() == "the operator's own settings\n"
    assert git("symbolic-ref", "--short", "HEAD", cwd=local) == "main"
    assert "runner/68686868" not in git("branch", "--list", cwd=local)


def test_a_clone_whose_branch_cannot_be_kept_stays_and_says_where(tmp_path: Path) -> None:
    """The fetch of the job branch back into the repo failed (here: an object the agent removed):
    the folder then holds the job's commits alone, so it stays, and the error names it."""
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="clone", push=False)
    ws = prepare_workspace(repo, "69696969-a", settings)
    (ws.path / "change.txt").write_text("x\n")
    result = commit(ws)
    assert result.commit is not None and ws.git_dir is not None
    blob = git("rev-parse", f"{result.commit}:change.txt", cwd=ws.path)
    (ws.git_dir / "objects" / blob[:2] / blob[2:]).unlink()
    with pytest.raises(GitError) as err:
        cleanup_workspace(ws, repo, settings, failed=False)
    assert err.value.code == "cleanup_failed"
    assert f"stay in the workspace folder {ws.path}" in err.value.message
    assert ws.path.is_dir() and not ws.home.exists()


def test_in_place_cleanup_goes_back_when_the_job_stopped_tracking_an_ignored_file(tmp_path: Path) -> None:
    """The switch back to the original branch refused to overwrite ignored files too: a job that
    stopped tracking build output (`git rm --cached`, the folder ignored) left the repo on its job
    branch, and every later in_place job failed. Only the checkout to the job branch refuses."""
    local = make_repo(tmp_path / "repo", {"README.md": "hi\n", ".gitignore": "build/\n"})
    (local / "build").mkdir()
    (local / "build" / "out.txt").write_text("tracked output\n")
    git("add", "-f", "build/out.txt", cwd=local)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "track output", cwd=local)
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place", push=False)
    ws = prepare_workspace(repo, "70707070-a", settings)
    git("rm", "-q", "--cached", "build/out.txt", cwd=local)  # the job's change
    assert commit(ws).commit is not None
    cleanup_workspace(ws, repo, settings, failed=False)
    assert git("symbolic-ref", "--short", "HEAD", cwd=local) == "main"
    assert (local / "build" / "out.txt").read_text() == "tracked output\n"


def test_an_in_place_repo_may_keep_its_packs_behind_a_symlink(tmp_path: Path) -> None:
    """The scan for symlinks in `.git/objects` refused any: an operator's repo whose `pack` folder
    was moved to another disk could no longer commit. Only the loose-object folders (`objects/ab`)
    carry the runner's writes."""
    import shutil

    local = make_repo(tmp_path / "repo")
    packs = tmp_path / "other-disk" / "pack"
    packs.parent.mkdir()
    shutil.move(str(local / ".git" / "objects" / "pack"), str(packs))
    (local / ".git" / "objects" / "pack").symlink_to(packs)
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place", push=False)
    ws = prepare_workspace(repo, "71717171-a", settings)
    (local / "new.txt").write_text("x\n")
    assert commit(ws).files_changed == 1
    cleanup_workspace(ws, repo, settings, failed=False)


def test_a_cancel_kills_the_stages_git_and_never_the_cleanups(tmp_path: Path) -> None:
    """The kill scanned for every process of the job for a second: the cleanup's git, started as
    soon as the killed stage failed, was caught too. Only git that carries `RUNNER_GIT_STAGE` (a
    prepare, commit or push) is the cancel's to kill."""
    import os
    import subprocess

    from codex_runner.execution.procscan import find_job_processes, kill_job_processes

    job = "72727272-0000-4000-8000-000000000000"
    base = {"PATH": os.environ["PATH"], "RUNNER_JOB_ID": job}
    stage = subprocess.Popen(
        ["sleep", "30"], env={**base, "RUNNER_GIT_STAGE": "push"}, start_new_session=True
    )
    cleanup = subprocess.Popen(["sleep", "30"], env=base, start_new_session=True)
    try:
        import time

        deadline = time.monotonic() + 5
        while len(find_job_processes({job}).get(job, [])) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert find_job_processes({job}, git_stage_only=True) == {job: [stage.pid]}
        kill_job_processes({job}, timeout=0.5, git_stage_only=True)
        assert stage.wait(5) == -9
        assert cleanup.poll() is None
    finally:
        for proc in (stage, cleanup):
            proc.kill()
            proc.wait(5)


def _within(seconds: float, fifo: Path, call: Callable[[], object]) -> BaseException | None:
    """Runs `call` in a thread and returns what it raised. If it still runs after `seconds` (a git
    that waits on the named pipe `fifo`), the pipe is opened from here so that git goes on and
    the thread ends, and the test fails."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    stuck = thread.is_alive()
    while thread.is_alive():
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # O_RDWR never blocks: the waiting git's partner
        time.sleep(0.2)
        os.close(fd)
        thread.join(1)
    assert not stuck, f"the runner's git still waited on {fifo} after {seconds} s"
    return raised[0] if raised else None


@pytest.mark.parametrize(
    ("mode", "where", "stage"),
    [
        ("clone", "sub/.gitignore", "commit"),
        ("clone", ".git/config", "commit"),
        ("in_place", ".git/info/exclude", "commit"),
        ("in_place", ".gitignore", "cleanup"),
    ],
)
def test_a_named_pipe_where_git_reads_fails_the_stage_at_once(
    tmp_path: Path, mode: str, where: str, stage: str
) -> None:
    """The agent made a FIFO where git opens a file by name (a folder's `.gitignore`, the
    config, `info/exclude`): `open()` waits for a writer that never comes, and the runner's
    `add`, `symbolic-ref` or `clean` sat there until its 10-minute timeout, an in_place cleanup
    holding the repo lock all along. The stage now fails within a second, naming the pipe."""
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace=mode, push=False)
    ws = prepare_workspace(repo, "73737373-a", settings)
    fifo = ws.path / where
    fifo.parent.mkdir(parents=True, exist_ok=True)
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    (ws.path / "sub" / "work.txt").parent.mkdir(exist_ok=True)
    (ws.path / "sub" / "work.txt").write_text("work\n")
    if stage == "commit":
        error = _within(20, fifo, lambda: commit(ws))
    else:
        error = _within(20, fifo, lambda: cleanup_workspace(ws, repo, settings, failed=False))
    assert isinstance(error, GitError), error
    assert error.code == f"{stage}_failed"
    assert "named pipe" in error.message and repr(str(fifo)) in error.message
    fifo.unlink()
    cleanup_workspace(ws, repo, settings, failed=False)
    assert git("symbolic-ref", "--short", "HEAD", cwd=local) == "main"


@pytest.mark.parametrize("operation", ["rebase", "cherry-pick", "am", "recovering rebase"])
def test_an_in_place_cleanup_ends_an_operation_the_job_left_half_done(tmp_path: Path, operation: str) -> None:
    """The agent started a rebase, a cherry-pick of several commits or an `am` that stopped on a
    conflict. The cleanup reset the files and went back to the operator's branch, but left
    `rebase-merge`, `sequencer` or `rebase-apply` in `.git`: the operator's `git status` showed
    the job's operation in progress, and its `--abort` would reset to where the job's operation
    began (back on the job branch, or the operator's branch moved there, their work gone)."""
    local = make_repo(tmp_path / "repo")
    ident = ("-c", "user.name=a", "-c", "user.email=a@a")
    git("checkout", "-q", "-b", "other", cwd=local)
    for text in ("other 1\n", "other 2\n"):
        (local / "README.md").write_text(text)
        git(*ident, "commit", "-qam", text.strip(), cwd=local)
    patch = git("format-patch", "-1", "--stdout", "HEAD", cwd=local) + "\n"
    git("checkout", "-q", "main", cwd=local)
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place", push=False)
    ws = prepare_workspace(repo, "74747474-a", settings)
    (local / "README.md").write_text("the job's\n")  # the agent: a commit, then the operation
    git(*ident, "commit", "-qam", "job", cwd=local)
    command = {
        "rebase": ["rebase", "other"],
        "recovering rebase": ["rebase", "other"],
        "cherry-pick": ["cherry-pick", "other~1", "other"],
        "am": ["am", "-3"],
    }[operation]
    started = subprocess.run(
        ["git", *ident, *command], cwd=local, input=patch, capture_output=True, text=True, check=False
    )
    assert started.returncode != 0, started  # stopped on the conflict, as the agent left it
    states = ("rebase-merge", "rebase-apply", "sequencer", "REBASE_HEAD", "CHERRY_PICK_HEAD", "MERGE_HEAD")
    assert any((local / ".git" / name).exists() for name in states)
    if operation != "recovering rebase":
        assert commit(ws).commit is not None
    cleanup_workspace(ws, repo, settings, failed=False, recovering=operation == "recovering rebase")
    assert [name for name in states if (local / ".git" / name).exists()] == []
    assert git("symbolic-ref", "--short", "HEAD", cwd=local) == "main"
    assert git("status", "--porcelain", cwd=local) == ""
    main = git("rev-parse", "main", cwd=local)
    for abort in (["rebase", "--abort"], ["cherry-pick", "--abort"], ["am", "--abort"]):
        subprocess.run(["git", *abort], cwd=local, capture_output=True, check=False)
    assert git("symbolic-ref", "--short", "HEAD", cwd=local) == "main"
    assert git("rev-parse", "main", cwd=local) == main


def test_an_in_place_cleanup_keeps_what_the_operators_branch_ignores(tmp_path: Path) -> None:
    """The job committed a `.gitignore` that no longer ignores the operator's `.env` (the agent
    tidied it), then failed. The cleanup's `git clean` ran on the job branch, under the job's
    rules, and deleted `.env` for good: it was never in any commit. It now runs once the repo is
    back on the operator's branch, under its rules."""
    local = make_repo(tmp_path / "repo", {"README.md": "hi\n", ".gitignore": ".env\n"})
    (local / ".env").write_text("SECRET=the operator's\n")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place", push=False)
    ws = prepare_workspace(repo, "75757575-a", settings)
    (local / ".gitignore").write_text("# tidied\n")  # the agent
    git("-c", "user.name=a", "-c", "user.email=a@a", "commit", "-qm", "tidy", ".gitignore", cwd=local)
    (local / "left.txt").write_text("the job's leftover\n")
    cleanup_workspace(ws, repo, settings, failed=True)
    assert (local / ".env").read_text() == "SECRET=the operator's\n"
    assert not (local / "left.txt").exists()
    assert git("symbolic-ref", "--short", "HEAD", cwd=local) == "main"
    assert git("status", "--porcelain", cwd=local) == ""


def test_an_in_place_cleanup_goes_back_over_a_file_the_job_stopped_tracking(tmp_path: Path) -> None:
    """The job committed the removal of a tracked file and a later step made it again,
    untracked: the switch back must put the operator's branch's version there, not fail."""
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place", push=False)
    ws = prepare_workspace(repo, "76767676-a", settings)
    git("rm", "-q", "README.md", cwd=local)
    git("-c", "user.name=a", "-c", "user.email=a@a", "commit", "-qm", "drop", cwd=local)
    (local / "README.md").write_text("made again\n")
    cleanup_workspace(ws, repo, settings, failed=True)
    assert (local / "README.md").read_text() == "hello\n"
    assert git("symbolic-ref", "--short", "HEAD", cwd=local) == "main"
    assert git("status", "--porcelain", cwd=local) == ""


def test_in_place_refuses_a_base_branch_that_does_not_ignore_the_operators_files(tmp_path: Path) -> None:
    """The operator works on `dev`, whose `.gitignore` ignores `.env`; the repo's `branch` is
    `main`, which does not. The tree was clean on `dev`, so the job started on `main` with `.env`
    untracked: the runner's `add -A` committed the operator's secret (and pushed it), and the
    switch back then removed it from the folder. The set-up now refuses, naming it, and leaves
    the repo as it was."""
    local = make_repo(tmp_path / "repo")
    git("checkout", "-q", "-b", "dev", cwd=local)
    (local / ".gitignore").write_text(".env\n")
    git("add", ".gitignore", cwd=local)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "ignore", cwd=local)
    (local / ".env").write_text("SECRET=the operator's\n")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), branch="main", workspace="in_place", push=False)
    with pytest.raises(GitError) as err:
        prepare_workspace(repo, "77777777-a", settings)
    assert err.value.code == "prepare_failed" and ".env" in err.value.message
    assert (local / ".env").read_text() == "SECRET=the operator's\n"
    assert git("symbolic-ref", "--short", "HEAD", cwd=local) == "dev"
    assert "runner/77777777" not in git("branch", "--list", cwd=local)
    assert git("status", "--porcelain", cwd=local) == ""


def test_in_place_refuses_changes_hidden_by_assume_unchanged(tmp_path: Path) -> None:
    """The operator keeps local settings in a tracked file marked `--assume-unchanged` (a common
    way to keep them out of commits). git hides the change, so the tree looked clean and the job
    ran; its cleanup's `reset --hard` then wrote the file over: the operator's settings were gone.
    The set-up now refuses, naming the file, and the repo stays as it was."""
    local = make_repo(tmp_path / "repo", {"README.md": "hi\n", "config.local": "default\n"})
    (local / "config.local").write_text("the operator's settings\n")
    git("update-index", "--assume-unchanged", "config.local", cwd=local)
    assert git("status", "--porcelain", cwd=local) == ""
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place", push=False)
    with pytest.raises(GitError) as err:
        ws = prepare_workspace(repo, "78787878-a", settings)
        cleanup_workspace(ws, repo, settings, failed=True)
    assert err.value.code == "prepare_failed" and "config.local" in err.value.message
    assert (local / "config.local").read_text() == "the operator's settings\n"
    assert git("symbolic-ref", "--short", "HEAD", cwd=local) == "main"


@pytest.mark.parametrize("state", ["CHERRY_PICK_HEAD", "MERGE_HEAD"])
def test_the_runners_commit_takes_over_no_operation_the_agent_left(tmp_path: Path, state: str) -> None:
    """`git commit` finished what the agent had left in progress: with a CHERRY_PICK_HEAD (which
    the agent can write, naming any commit) the runner's commit took that commit's author, not
    RUNNER_GIT_AUTHOR_NAME; with a MERGE_HEAD it became a merge of whatever that names. The
    commit is plumbing now: one parent, the runner's author."""
    local = make_repo(tmp_path / "repo")
    git("checkout", "-q", "-b", "other", cwd=local)
    (local / "other.txt").write_text("other\n")
    git("add", "-A", cwd=local)
    git("-c", "user.name=Someone", "-c", "user.email=someone@corp", "commit", "-qm", "o", cwd=local)
    git("checkout", "-q", "main", cwd=local)
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="clone", push=False)
    ws = prepare_workspace(repo, "79797979-a", settings)
    assert ws.git_dir is not None
    (ws.path / "work.txt").write_text("work\n")
    (ws.git_dir / state).write_text(git("rev-parse", "other", cwd=local) + "\n")
    result = commit(ws)
    assert result.commit is not None
    shown = git("log", "-1", "--format=%an <%ae>|%P", result.commit, cwd=ws.path)
    assert shown == f"Runner <r@x.io>|{ws.base_commit}"
    cleanup_workspace(ws, repo, settings, failed=False)
