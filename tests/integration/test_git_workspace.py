"""Workspaces with real git: the four modes, commit counts, push to a file:// remote, cleanup rules,
validation, and the fixed git environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from codex_runner.config import Settings
from codex_runner.execution import workspace
from codex_runner.execution.git import run_git
from codex_runner.execution.gitutil import repo_lock
from codex_runner.execution.workspace import (
    CommitResult,
    GitError,
    Workspace,
    cleanup_workspace,
    commit_changes,
    prepare_workspace,
    push_branch,
    remove_empty_scratch,
    validate_ref_name,
    validate_source,
)

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Repo:
    id: str
    source: str
    source_type: str = "local_path"
    branch: str | None = "main"
    workspace: str = "worktree"
    push: bool = True


def git(*args: str, cwd: Path | None = None, input: str | None = None) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True, input=input
    ).stdout.strip()


def make_repo(path: Path, files: dict[str, str] | None = None) -> Path:
    git("init", "-q", "-b", "main", str(path))
    for name, text in (files or {"README.md": "hello\n", "src/app.py": "a = 1\nb = 2\nc = 3\n"}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git("add", "-A", cwd=path)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=path)
    return path


def settings_for(tmp: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp / "data", workspace_dir=tmp / "data" / "workspaces", **kw)  # type: ignore[arg-type]


def commit(ws: Workspace) -> CommitResult:
    return commit_changes(
        ws, message=f"codex.exec: job {ws.job_id}", author_name="Runner", author_email="r@x.io"
    )


@pytest.fixture
def local(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


def test_worktree_jobs_are_isolated_and_cleanup_keeps_branches_with_commits(
    tmp_path: Path, local: Path
) -> None:
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local))
    spaces: dict[str, Workspace] = {}
    errors: list[BaseException] = []

    def job(job_id: str) -> None:
        try:
            spaces[job_id] = prepare_workspace(repo, job_id, settings)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(jid,)) for jid in ("11111111-a", "22222222-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    one, two = spaces["11111111-a"], spaces["22222222-b"]
    assert one.path == settings.workspace_dir.resolve() / "11111111-a"
    assert (one.mode, one.branch, one.base_branch) == ("worktree", "runner/11111111", "main")
    assert one.base_commit == git("rev-parse", "main", cwd=local)
    (one.path / "only-one.txt").write_text("one\n")
    (two.path / "README.md").write_text("changed by two\n")
    assert not (two.path / "only-one.txt").exists()
    assert (one.path / "README.md").read_text() == "hello\n"

    result = commit(one)
    assert result.commit and (result.files_changed, result.lines_added, result.lines_removed) == (1, 1, 0)
    assert git("log", "-1", "--format=%an <%ae>|%cn|%s", result.commit, cwd=local) == (
        "Runner <r@x.io>|Runner|codex.exec: job 11111111-a"
    )
    assert git("status", "--porcelain", cwd=two.path) == "M README.md"  # two's change is only two's

    cleanup_workspace(one, repo, settings, failed=False)
    cleanup_workspace(two, repo, settings, failed=False)
    assert not one.path.exists() and not two.path.exists() and not one.home.exists()
    worktrees = git("worktree", "list", "--porcelain", cwd=local).splitlines()
    # The repo itself, plus at most the warm spare the runner keeps for the next job.
    assert [w for w in worktrees if w.startswith("worktree ") and "/.spares/" not in w] == [
        f"worktree {local}"
    ]
    branches = git("branch", "--format=%(refname:short)", cwd=local).split()
    assert "runner/11111111" in branches  # has a commit: kept
    assert "runner/22222222" not in branches  # nothing committed: deleted
    assert git("status", "--porcelain", cwd=local) == ""


def test_nothing_changed_gives_no_commit(tmp_path: Path) -> None:
    local = make_repo(tmp_path / "repo", {"README.md": "hello\n", ".gitignore": "*.log\n"})
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local))
    ws = prepare_workspace(repo, "33333333-c", settings)
    (ws.path / "build.log").write_text("ignored output\n")  # only ignored files: nothing to commit
    assert commit(ws) == CommitResult(None, 0, 0, 0)
    assert git("rev-parse", "runner/33333333", cwd=local) == ws.base_commit
    cleanup_workspace(ws, repo, settings, failed=False)
    assert "runner/33333333" not in git("branch", cwd=local)


def test_counts_binary_files_renames_and_respects_gitignore(tmp_path: Path) -> None:
    files = {
        "README.md": "hello\n",
        "src/app.py": "a = 1\nb = 2\nc = 3\n",
        ".gitignore": "*.log\n",
        "old.txt": "x\n",
    }
    local = make_repo(tmp_path / "repo", files)
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="clone")
    ws = prepare_workspace(repo, "55555555-e", settings)
    (ws.path / "src/app.py").write_text("a = 1\nc = 3\nd = 4\ne = 5\n")  # +2 -1
    (ws.path / "logo.png").write_bytes(bytes(range(256)) * 4)  # binary: a file, no lines
    (ws.path / "build.log").write_text("ignored\n")
    (ws.path / "old.txt").rename(ws.path / "new.txt")  # a rename is one file
    (ws.path / "README.md").unlink()  # -1
    result = commit(ws)
    assert result.commit is not None
    assert (result.files_changed, result.lines_added, result.lines_removed) == (4, 2, 2)
    tree = git("ls-tree", "-r", "--name-only", result.commit, cwd=ws.path).split()
    assert "build.log" not in tree and "logo.png" in tree and "new.txt" in tree
    cleanup_workspace(ws, repo, settings, failed=False)
    assert not ws.path.exists()
    # The clone is gone but its commit is kept on the job branch of the repo it came from.
    assert git("rev-parse", "runner/55555555", cwd=local) == result.commit


def test_file_url_repo_is_mirrored_cloned_and_pushed_back(tmp_path: Path) -> None:
    seed = make_repo(tmp_path / "seed")
    bare = tmp_path / "origin.git"
    git("clone", "-q", "--bare", str(seed), str(bare))
    settings = settings_for(tmp_path)
    repo = Repo("remote", f"file://{bare}", source_type="git_url", branch="main", workspace="clone")

    first = prepare_workspace(repo, "66666666-f", settings)
    assert first.store is not None and first.store.parent == settings.mirrors_dir.resolve()
    mirror_inode = first.store.stat().st_ino
    (first.path / "feature.txt").write_text("new\nfile\n")
    result = commit(first)
    assert result.files_changed == 1 and result.lines_added == 2
    push_branch(first, repo, None)
    assert git("rev-parse", "refs/heads/runner/66666666", cwd=bare) == result.commit
    assert git("config", "--get", "remote.origin.url", cwd=first.path) == repo.source
    cleanup_workspace(first, repo, settings, failed=False)

    # New upstream work arrives through the fetch; the mirror itself is reused, not cloned again.
    (seed / "README.md").write_text("hello\nagain\n")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "more", cwd=seed)
    git("push", "-q", str(bare), "main", cwd=seed)
    second = prepare_workspace(repo, "77777777-g", settings)
    assert second.store == first.store and second.store.stat().st_ino == mirror_inode
    assert second.base_commit == git("rev-parse", "main", cwd=seed)
    assert (second.path / "README.md").read_text() == "hello\nagain\n"
    assert not (second.path / "feature.txt").exists()
    assert "[remote" not in (second.store / "config").read_text()  # the URL is never stored in the mirror
    cleanup_workspace(second, repo, settings, failed=False)


def test_mirror_upkeep_runs_after_the_prepare_not_inside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packs pile up in a mirror (one per fetch that brings over 100 objects). Past
    `gc.autoPackLimit` (50) git repacks, which on a big repo takes seconds: the job's fetch skips
    that, and the prepare asks the background thread to do it instead."""
    seed = make_repo(tmp_path / "seed")
    bare = tmp_path / "origin.git"
    git("clone", "-q", "--bare", str(seed), str(bare))
    settings = settings_for(tmp_path, warm_workspaces=0)
    repo = Repo("remote", f"file://{bare}", source_type="git_url", branch="main", workspace="clone")
    queued: list[tuple[object, str, Callable[[], object]]] = []
    monkeypatch.setattr(workspace, "run_in_background", lambda *request: queued.append(request))

    first = prepare_workspace(repo, "66666666-f", settings)
    mirror = first.store
    assert mirror is not None
    for i in range(55):  # 55 small packs, as many fetches would leave
        blob = git("hash-object", "-w", "--stdin", input=f"object {i}\n", cwd=mirror)
        git("pack-objects", "-q", str(mirror / "objects/pack/pack"), input=f"{blob}\n", cwd=mirror)
    packs = lambda: len(list((mirror / "objects/pack").glob("*.pack")))  # noqa: E731
    assert packs() >= 55
    (seed / "README.md").write_text("hello\nagain\n")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "more", cwd=seed)
    git("push", "-q", str(bare), "main", cwd=seed)
    queued.clear()

    second = prepare_workspace(repo, "77777777-g", settings)  # its fetch brings a commit
    assert second.base_commit == git("rev-parse", "main", cwd=seed)
    assert packs() >= 55  # the fetch did not repack
    [(key, what, task)] = queued
    assert key == ("upkeep", mirror)
    assert what == "mirror_upkeep"
    task()
    assert packs() <= 2
    assert git("rev-parse", "refs/remotes/origin/main", cwd=mirror) == second.base_commit
    assert not list((settings.data_dir / "git-home").glob("upkeep-*"))  # its git HOME is gone
    cleanup_workspace(first, repo, settings, failed=False)
    cleanup_workspace(second, repo, settings, failed=False)


def test_url_repo_in_worktree_mode_uses_the_mirror(tmp_path: Path) -> None:
    seed = make_repo(tmp_path / "seed")
    bare = tmp_path / "origin.git"
    git("clone", "-q", "--bare", str(seed), str(bare))
    settings = settings_for(tmp_path)
    repo = Repo("remote", str(bare), source_type="git_url", branch=None, workspace="worktree")
    ws = prepare_workspace(repo, "88888888-h", settings)
    assert ws.base_branch == "main" and (ws.path / "src/app.py").exists()
    (ws.path / "x.txt").write_text("x\n")
    assert commit(ws).files_changed == 1
    push_branch(ws, repo, None)
    assert git("rev-parse", "--verify", "refs/heads/runner/88888888", cwd=bare)
    cleanup_workspace(ws, repo, settings, failed=False)
    assert not ws.path.exists()


def test_failed_workspaces_are_kept_when_asked(tmp_path: Path, local: Path) -> None:
    repo = Repo("widgets", str(local))
    keep_failed = settings_for(tmp_path, keep_failed_workspaces=True)
    ws = prepare_workspace(repo, "99999999-i", keep_failed)
    cleanup_workspace(ws, repo, keep_failed, failed=True)
    assert ws.path.is_dir() and "runner/99999999" in git("branch", cwd=local)
    no_cleanup = settings_for(tmp_path, cleanup_after_job=False)
    ws2 = prepare_workspace(repo, "aaaaaaaa-j", no_cleanup)
    cleanup_workspace(ws2, repo, no_cleanup, failed=False)
    assert ws2.path.is_dir()
    ws3 = prepare_workspace(repo, "bbbbbbbb-k", keep_failed)
    cleanup_workspace(ws3, repo, keep_failed, failed=False)  # succeeded: removed
    assert not ws3.path.exists()


def test_in_place_switches_to_the_job_branch_and_back(tmp_path: Path, local: Path) -> None:
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place")
    git("switch", "-q", "-c", "dev", cwd=local)
    ws = prepare_workspace(repo, "cccccccc-l", settings)
    assert ws.path == local and git("branch", "--show-current", cwd=local) == "runner/cccccccc"
    (local / "made-by-job.txt").write_text("x\n")
    result = commit(ws)
    (local / "left-over.txt").write_text("uncommitted\n")
    cleanup_workspace(ws, repo, settings, failed=False)
    assert git("branch", "--show-current", cwd=local) == "dev"
    assert git("status", "--porcelain", cwd=local) == "" and local.is_dir()
    assert git("rev-parse", "runner/cccccccc", cwd=local) == result.commit

    (local / "dirty.txt").write_text("operator's work\n")
    with pytest.raises(GitError) as err:
        prepare_workspace(repo, "dddddddd-m", settings)
    assert err.value.code == "prepare_failed" and "uncommitted" in err.value.message
    assert (local / "dirty.txt").exists()


def test_in_place_on_an_operators_branch_ahead_of_the_base_runs_from_the_base_and_goes_back(
    tmp_path: Path, local: Path
) -> None:
    """The operator left the in_place repo on a branch of their own, a commit ahead of the repo's
    `branch`: the job runs from the base (not from the operator's work), its commit's parent is
    the base, and the cleanup puts the repo back on the operator's branch with their file."""
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place")
    main = git("rev-parse", "main", cwd=local)
    git("switch", "-q", "-c", "feature", cwd=local)
    (local / "feature.txt").write_text("the operator's work\n")
    git("add", "feature.txt", cwd=local)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "feature", cwd=local)
    ws = prepare_workspace(repo, "abababab-f", settings)
    assert ws.base_commit == main and git("branch", "--show-current", cwd=local) == "runner/abababab"
    assert not (local / "feature.txt").exists()
    (local / "made-by-job.txt").write_text("x\n")
    result = commit(ws)
    assert result.commit is not None and result.files_changed == 1
    cleanup_workspace(ws, repo, settings, failed=False)
    assert git("branch", "--show-current", cwd=local) == "feature"
    assert git("status", "--porcelain", cwd=local) == ""
    assert (local / "feature.txt").read_text() == "the operator's work\n"
    assert not (local / "made-by-job.txt").exists()
    assert git("rev-parse", "runner/abababab^", cwd=local) == main


def test_scratch_is_an_empty_folder(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    repo = Repo("scratch", "/nonexistent", workspace="scratch")
    ws = prepare_workspace(repo, "eeeeeeee-n", settings)
    assert ws.path.is_dir() and not any(ws.path.iterdir()) and ws.branch is None
    (ws.path / "out.txt").write_text("x")
    assert commit(ws) == CommitResult(None, 0, 0, 0)
    cleanup_workspace(ws, repo, settings, failed=False)
    assert not ws.path.exists()


def test_prepare_errors_have_codes_and_leave_nothing_behind(tmp_path: Path, local: Path) -> None:
    settings = settings_for(tmp_path)
    cases = [
        (Repo("w", str(local), branch="nope"), "branch_failed"),
        (Repo("w", str(tmp_path / "missing")), "clone_failed"),
        (
            Repo("w", f"file://{tmp_path / 'missing.git'}", source_type="git_url", workspace="clone"),
            "clone_failed",
        ),
        (Repo("w", f"file://{local}", source_type="git_url", workspace="in_place"), "prepare_failed"),
        (Repo("w", "ext::sh -c touch% /tmp/pwned", source_type="git_url", workspace="clone"), "clone_failed"),
        (Repo("w", str(local), branch="bad..name"), "branch_failed"),
    ]
    for i, (repo, code) in enumerate(cases):
        with pytest.raises(GitError) as err:
            prepare_workspace(repo, f"f{i}ffffff-o", settings)
        assert err.value.code == code, (repo, err.value.message)
    assert not settings.workspace_dir.exists() or not any(settings.workspace_dir.iterdir())
    assert not (settings.data_dir / "git-home").exists() or not any(
        (settings.data_dir / "git-home").iterdir()
    )
    worktrees = git("worktree", "list", "--porcelain", cwd=local).splitlines()
    # The repo itself, plus at most the warm spare the runner keeps for the next job.
    assert [w for w in worktrees if w.startswith("worktree ") and "/.spares/" not in w] == [
        f"worktree {local}"
    ]
    with pytest.raises(GitError):
        prepare_workspace(Repo("w", str(local)), "../escape", settings)


def test_commit_and_push_errors(tmp_path: Path, local: Path) -> None:
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local))
    ws = prepare_workspace(repo, "12121212-p", settings)
    (ws.path / "a.txt").write_text("a\n")
    commit(ws)
    with pytest.raises(GitError) as err:
        push_branch(ws, repo, None)  # the local repo has no origin
    assert err.value.code == "push_failed"
    cleanup_workspace(ws, repo, settings, failed=False)
    # The origin is read when the workspace is prepared (before the agent runs).
    git("remote", "add", "origin", str(tmp_path / "gone.git"), cwd=local)
    ws = prepare_workspace(repo, "13131313-q", settings)
    (ws.path / "a.txt").write_text("a\n")
    commit(ws)
    with pytest.raises(GitError) as err:
        push_branch(ws, repo, None)
    assert err.value.code == "push_failed" and "gone.git" in err.value.message
    cleanup_workspace(ws, repo, settings, failed=False)


def test_agent_cannot_redirect_git_or_run_hooks(
    tmp_path: Path, local: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "hook-ran"
    hook = f"#!/bin/sh\ntouch {marker}\n"
    for name in ("pre-commit", "post-checkout", "commit-msg", "post-commit", "reference-transaction"):
        (local / ".git" / "hooks" / name).write_text(hook)
        (local / ".git" / "hooks" / name).chmod(0o755)
    # A user-level config of the service account must not bleed in either.
    fake_home = tmp_path / "home"
    fake_home.mkdir()
    (fake_home / ".gitconfig").write_text(f"[core]\n\thooksPath = {local / '.git' / 'hooks'}\n")
    monkeypatch.setenv("HOME", str(fake_home))
    other = make_repo(tmp_path / "other")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local))
    ws = prepare_workspace(repo, "13131313-q", settings)
    # The agent points the workspace's .git at another repository and adds an exotic config.
    (ws.path / ".git").write_text(f"gitdir: {other / '.git'}\n")
    (ws.path / "work.txt").write_text("work\n")
    result = commit(ws)
    assert result.commit and git("rev-parse", "runner/13131313", cwd=local) == result.commit
    assert git("rev-list", "--count", "HEAD", cwd=other) == "1"
    assert not marker.exists()
    cleanup_workspace(ws, repo, settings, failed=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name",
    [
        "main",
        "runner/abcd1234",
        "feature/x-y_z.1",
        "ünïcode",
        "",
        "-rf",
        "HEAD",
        "@",
        "a..b",
        "a//b",
        "/a",
        "a/",
        "a.",
        ".a",
        "a/.b",
        "a.lock",
        "a/b.lock/c",
        "a b",
        "a~1",
        "a^",
        "a:b",
        "a?",
        "a*",
        "a[b",
        "a\\b",
        "a@{1}",
        "a@b",
        "tab\tname",
        "del\x7f",
        "x/@",
    ],
)
def test_ref_names_follow_git_rules(name: str, tmp_path: Path) -> None:
    git_ok = (
        run_git(["check-ref-format", "--branch", name], home=tmp_path, check=False).returncode == 0
        if name
        else False
    )
    try:
        validate_ref_name(name)
        ours = True
    except GitError as exc:
        assert exc.code == "branch_failed"
        ours = False
    # `git check-ref-format --branch @` answers "@" (it means HEAD there); as a branch name we refuse it.
    assert ours == (git_ok and name != "@")


@pytest.mark.parametrize(
    "source",
    [
        "/srv/git/widgets",
        "https://github.com/acme/widgets.git",
        "https://oauth2@gitlab.example.com:8443/acme/widgets",
        "ssh://git@github.com/acme/widgets.git",
        "git@github.com:acme/widgets.git",
        "file:///srv/git/widgets.git",
        "http://127.0.0.1:9418/widgets.git",
        "http://localhost/widgets.git",
    ],
)
def test_sources_accepted(source: str) -> None:
    validate_source(source)


@pytest.mark.parametrize(
    "source",
    [
        "",
        " /srv/x",
        "-uhelp",
        "--upload-pack=touch /tmp/x",
        "ext::sh -c touch% /tmp/pwned",
        "fd::3",
        "git://github.com/acme/widgets.git",
        "ftp://example.com/x.git",
        "http://example.com/widgets.git",
        "https://user:ghp_secret@github.com/acme/widgets.git",
        "ssh://-oProxyCommand=touch%20x/y",
        "-oProxyCommand=x:y",
        "relative/path",
        "file://otherhost/x.git",
        "/srv/../etc",
        "/srv/x\nmalicious",
        "https://github.com/acme/widgets.git\x00",
        "host:-upload-pack",
    ],
)
def test_sources_refused(source: str) -> None:
    with pytest.raises(GitError) as err:
        validate_source(source)
    assert err.value.code == "clone_failed"


@pytest.mark.parametrize("mode", ["worktree", "in_place"])
def test_the_agent_cannot_choose_where_a_local_repo_pushes(tmp_path: Path, mode: str) -> None:
    """A local repo's origin is read before the agent runs: in worktree and in_place mode the agent
    can rewrite that config (`git remote set-url origin ...`), and the push must not follow it."""
    local = make_repo(tmp_path / "repo")
    bare, evil = tmp_path / "origin.git", tmp_path / "evil.git"
    git("clone", "-q", "--bare", str(local), str(bare))
    git("init", "-q", "--bare", str(evil))
    git("remote", "add", "origin", str(bare), cwd=local)
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace=mode)
    ws = prepare_workspace(repo, "17171717-a", settings)
    (ws.path / "work.txt").write_text("work\n")
    git("remote", "set-url", "origin", str(evil), cwd=ws.path)  # the agent
    result = commit(ws)
    push_branch(ws, repo, None)
    assert git("for-each-ref", cwd=evil) == ""
    assert git("rev-parse", "refs/heads/runner/17171717", cwd=bare) == result.commit
    cleanup_workspace(ws, repo, settings, failed=False)


@pytest.mark.parametrize("as_url", [False, True])
def test_a_push_to_a_local_origin_runs_none_of_its_hooks(tmp_path: Path, as_url: bool) -> None:
    """`git push` to a path starts the target's receive-pack, which runs the target's hooks as the
    runner with our config overrides cleared; the origin may be a repo an earlier job's agent made
    and named in the shared config. The branch arrives, no hook runs, and a non-fast-forward is
    still refused (the push is not forced)."""
    local = make_repo(tmp_path / "repo")
    bare = tmp_path / "origin.git"
    git("clone", "-q", "--bare", str(local), str(bare))
    marker = tmp_path / "hook-ran"
    for hook in ("pre-receive", "update", "post-receive", "post-update", "reference-transaction"):
        path = bare / "hooks" / hook
        path.write_text(f"#!/bin/sh\necho {hook} >> {marker}\n")
        path.chmod(0o755)
    git("remote", "add", "origin", bare.as_uri() if as_url else str(bare), cwd=local)
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="worktree")
    ws = prepare_workspace(repo, "18181818-a", settings)
    (ws.path / "work.txt").write_text("work\n")
    result = commit(ws)
    push_branch(ws, repo, None)
    assert git("rev-parse", "refs/heads/runner/18181818", cwd=bare) == result.commit
    assert not marker.exists(), marker.read_text()
    # Rewritten: no longer a fast-forward of what the origin has.
    git(
        "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-q", "--amend", "-m", "rewritten", cwd=ws.path
    )
    with pytest.raises(GitError) as err:
        push_branch(ws, repo, None)
    assert err.value.code == "push_failed"
    assert not marker.exists()
    cleanup_workspace(ws, repo, settings, failed=False)


@pytest.mark.parametrize("swap", ["gitfile", "symlink", "commondir", "refs-symlink"])
def test_a_clone_whose_git_dir_the_agent_swapped_commits_nowhere_else(tmp_path: Path, swap: str) -> None:
    """In clone mode the git dir lies in the workspace: the agent can replace it with a gitfile or a
    symlink naming the operator's repo, or make it a linked worktree's (`commondir`). The runner's
    commit must not then land in that repo (its HEAD moved, its index changed); the commit stage
    fails instead, and cleanup removes the folder without touching that repo."""
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="clone")
    ws = prepare_workspace(repo, "19191919-a", settings)
    assert ws.git_dir == ws.path / ".git"
    git_dir = ws.path / ".git"
    if swap == "gitfile":
        shutil.rmtree(git_dir)
        git_dir.write_text(f"gitdir: {local / '.git'}\n")
    elif swap == "symlink":
        shutil.rmtree(git_dir)
        git_dir.symlink_to(local / ".git")
    elif swap == "commondir":
        (git_dir / "commondir").write_text(f"{local / '.git'}\n")
    else:
        shutil.rmtree(git_dir / "refs" / "heads")
        (git_dir / "refs" / "heads").symlink_to(local / ".git" / "refs" / "heads")
    (ws.path / "agent.txt").write_text("agent\n")
    before = git("for-each-ref", cwd=local), git("symbolic-ref", "HEAD", cwd=local)
    with pytest.raises(GitError) as err:
        commit(ws)
    assert err.value.code == "commit_failed" and "repository it prepared" in err.value.message
    assert (git("for-each-ref", cwd=local), git("symbolic-ref", "HEAD", cwd=local)) == before
    assert git("status", "--porcelain", cwd=local) == ""
    cleanup_workspace(ws, repo, settings, failed=True)
    assert not ws.path.exists()
    assert (git("for-each-ref", cwd=local), git("symbolic-ref", "HEAD", cwd=local)) == before


@pytest.mark.parametrize("mode", ["clone", "worktree"])
def test_a_folder_the_agent_made_a_repository_is_not_committed_as_a_link(tmp_path: Path, mode: str) -> None:
    """`git init` in a subfolder (scaffolding tools do it): `add -A` stages a link to that repo's
    commit, not its files, so the job's commit named a commit that is never pushed and the files
    went with the workspace. The commit stage fails and says why; a submodule in .gitmodules is
    the agent's choice and goes through."""
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace=mode)
    ws = prepare_workspace(repo, "20202020-a", settings)
    app = ws.path / "app"
    app.mkdir()
    (app / "main.py").write_text("print('hi')\n")
    git("init", "-q", str(app))
    git("add", "-A", cwd=app)
    git("-c", "user.name=t", "-c", "user.email=t@e", "commit", "-q", "-m", "scaffold", cwd=app)
    (ws.path / "README.md").write_text("changed\n")
    with pytest.raises(GitError) as err:
        commit(ws)
    assert err.value.code == "commit_failed"
    assert err.value.message.startswith("app: a git repository of its own"), err.value.message
    (ws.path / ".gitmodules").write_text('[submodule "app"]\n\tpath = app\n\turl = ./app\n')
    result = commit(ws)
    assert result.commit is not None and result.files_changed == 3  # README, .gitmodules, the link
    cleanup_workspace(ws, repo, settings, failed=False)


def test_an_in_place_repo_on_a_job_branch_is_not_taken(tmp_path: Path) -> None:
    """Two catalog repos on one folder, or a cleanup that did not finish: the folder is on a job
    branch, and a second job must not take it (their work would mix)."""
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    a = Repo("app", str(local), workspace="in_place")
    b = Repo("app-ro", str(local), workspace="in_place")
    ws = prepare_workspace(a, "18181818-a", settings)
    with pytest.raises(GitError) as err:
        prepare_workspace(b, "19191919-b", settings)
    assert err.value.code == "prepare_failed" and "runner/18181818" in err.value.message
    cleanup_workspace(ws, a, settings, failed=False)
    cleanup_workspace(prepare_workspace(b, "19191919-c", settings), b, settings, failed=False)


def test_a_failing_in_place_cleanup_is_a_git_error(tmp_path: Path) -> None:
    """A lock some live git holds (the operator's, say) is respected: the cleanup fails."""
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place")
    ws = prepare_workspace(repo, "15151515-a", settings)
    (ws.path / "README.md").write_text("half-done\n")
    lock = local / ".git" / "index.lock"
    with lock.open("w"), pytest.raises(GitError) as err:  # held open, as a git writing the index holds it
        cleanup_workspace(ws, repo, settings, failed=True)
    assert err.value.code == "cleanup_failed"
    assert lock.exists() and git("symbolic-ref", "--short", "HEAD", cwd=local) == ws.branch


def test_an_in_place_cleanup_removes_the_locks_a_killed_git_left(tmp_path: Path) -> None:
    """A git the runner killed mid-write (a cancel's or a shutdown's kill of the commit, a crash)
    leaves `index.lock`: every later reset failed on it, the repo stayed on the job's branch and
    every next job on it failed `prepare_failed`. Nobody holds such a lock: it goes."""
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place")
    ws = prepare_workspace(repo, "15151515-b", settings)
    (ws.path / "README.md").write_text("half-done\n")
    for name in ("index.lock", "HEAD.lock", f"refs/heads/{ws.branch}.lock"):
        (local / ".git" / name).write_text("")
    cleanup_workspace(ws, repo, settings, failed=True)
    assert git("symbolic-ref", "--short", "HEAD", cwd=local) == "main"
    assert git("status", "--porcelain", cwd=local) == ""
    assert not list((local / ".git").rglob("*.lock"))
    prepare_workspace(repo, "15151516-c", settings)  # the next job takes the repo


@pytest.mark.parametrize("mode", ["clone", "worktree", "in_place"])
def test_a_filter_the_agent_configured_does_not_run_in_the_runners_git(tmp_path: Path, mode: str) -> None:
    """A filter driver the agent writes into the workspace's config (with a `.gitattributes` that
    names it) would run, outside the agent's sandbox, in the runner's `add -A` and in the
    cleanup's `reset` and `checkout`. Every driver is turned off for the runner's commands."""
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace=mode)
    ws = prepare_workspace(repo, "16161616-a", settings)
    marker = tmp_path / "filter-ran"
    for key in ("clean", "smudge"):
        git("config", f"filter.x.{key}", f"sh -c 'touch {marker}; cat'", cwd=ws.path)
    git("config", "filter.x.required", "true", cwd=ws.path)
    (ws.path / ".gitattributes").write_text("* filter=x\n")
    (ws.path / "work.txt").write_text("work\n")
    result = commit(ws)
    assert result.files_changed == 2
    (ws.path / "work.txt").write_text("left uncommitted\n")
    cleanup_workspace(ws, repo, settings, failed=True)
    assert not marker.exists()


@pytest.mark.parametrize("mode", ["clone", "worktree", "in_place"])
def test_a_filter_included_only_on_the_job_branch_does_not_run_in_the_commit(
    tmp_path: Path, mode: str
) -> None:
    """The agent leaves HEAD on a branch of its own and adds an `includeIf "onbranch:runner/**"`
    that defines a filter driver: the guard must be read once the runner has put HEAD back on the
    job branch, where `add -A` loads that include."""
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace=mode)
    ws = prepare_workspace(repo, "17171717-a", settings)
    marker = tmp_path / "filter-ran"
    git("checkout", "-q", "-b", "elsewhere", cwd=ws.path)
    evil = tmp_path / "evil.cfg"
    evil.write_text(f'[filter "x"]\n\tclean = "sh -c \'touch {marker}; cat\'"\n')
    git("config", "includeIf.onbranch:runner/**.path", str(evil), cwd=ws.path)
    (ws.path / ".gitattributes").write_text("* filter=x\n")
    (ws.path / "work.txt").write_text("work\n")
    result = commit(ws)
    assert result.files_changed == 2
    assert not marker.exists()
    cleanup_workspace(ws, repo, settings, failed=True)
    assert not marker.exists()


def test_the_filter_guard_names_every_driver_of_the_config_and_its_includes(tmp_path: Path) -> None:
    from codex_runner.execution.gitutil import filter_guard

    local = make_repo(tmp_path / "repo")
    git("config", "filter.lfs.clean", "git-lfs clean -- %f", cwd=local)
    (tmp_path / "included").write_text('[filter "a b"]\n\tprocess = evil\n')
    git("config", "include.path", str(tmp_path / "included"), cwd=local)
    guard = dict(filter_guard(local / ".git", tmp_path / "home"))
    for driver in ("lfs", "a b"):
        assert guard[f"filter.{driver}.clean"] == guard[f"filter.{driver}.process"] == ""
        assert guard[f"filter.{driver}.smudge"] == "" and guard[f"filter.{driver}.required"] == "false"
    assert filter_guard(make_repo(tmp_path / "plain") / ".git", tmp_path / "home") == ()


def test_a_filter_one_worktree_job_configured_does_not_run_in_the_next_prepare(tmp_path: Path) -> None:
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path, warm_workspaces=0)
    repo = Repo("widgets", str(local), workspace="worktree")
    ws = prepare_workspace(repo, "20202020-a", settings)
    marker = tmp_path / "smudge-ran"
    git("config", "filter.x.smudge", f"sh -c 'touch {marker}; cat'", cwd=ws.path)  # the shared config
    (tmp_path / "attrs").write_text("* filter=x\n")
    git("config", "core.attributesFile", str(tmp_path / "attrs"), cwd=ws.path)
    cleanup_workspace(ws, repo, settings, failed=False)
    following = prepare_workspace(repo, "21212121-b", settings)
    cleanup_workspace(following, repo, settings, failed=False)
    assert not marker.exists()


def test_push_ignores_remote_settings_the_agent_wrote(tmp_path: Path) -> None:
    seed = make_repo(tmp_path / "seed")
    bare = tmp_path / "origin.git"
    evil = tmp_path / "evil.git"
    git("clone", "-q", "--bare", str(seed), str(bare))
    git("init", "-q", "--bare", str(evil))
    settings = settings_for(tmp_path)
    repo = Repo("remote", f"file://{bare}", source_type="git_url", workspace="clone")
    ws = prepare_workspace(repo, "14141414-r", settings)
    (ws.path / "a.txt").write_text("a\n")
    result = commit(ws)
    with (ws.path / ".git" / "config").open("a") as fh:
        fh.write(
            f'[url "file://{evil}"]\n\tinsteadOf = file://{bare}\n[remote "origin"]\n\tpushurl = {evil}\n'
        )
    push_branch(ws, repo, None)
    assert git("rev-parse", "refs/heads/runner/14141414", cwd=bare) == result.commit
    assert git("for-each-ref", cwd=evil) == ""
    cleanup_workspace(ws, repo, settings, failed=False)


def test_repo_lock_gives_up_on_a_holder_that_never_lets_go(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    # flock is per open file: a second open in this process contends as another process would.
    with repo_lock(settings, "frozen-repo"):
        started = time.monotonic()
        with (
            pytest.raises(GitError, match="held by someone else for 1 s") as err,
            repo_lock(settings, "frozen-repo", timeout=1.0),
        ):
            pytest.fail("the lock was taken twice")
        assert err.value.code == "prepare_failed"
        assert 1.0 <= time.monotonic() - started < 5
        with repo_lock(settings, "another-repo", timeout=0.5):
            pass  # other repos are not held up
    with repo_lock(settings, "frozen-repo", timeout=0.5):
        pass  # released: taken at once


def test_remove_empty_scratch_does_only_the_cheap_case(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    repo = Repo("s", str(tmp_path), workspace="scratch")
    empty = prepare_workspace(repo, "11111111-a", settings)
    assert remove_empty_scratch(empty, settings, failed=False) and not empty.path.exists()
    assert remove_empty_scratch(empty, settings, failed=False)  # already gone: nothing to do

    busy = prepare_workspace(repo, "22222222-b", settings)
    (busy.path / "out.txt").write_text("x\n")
    assert not remove_empty_scratch(busy, settings, failed=False) and busy.path.exists()
    cleanup_workspace(busy, repo, settings, failed=False)
    assert not busy.path.exists()

    linked = prepare_workspace(repo, "33333333-c", settings)
    linked.path.rmdir()
    (tmp_path / "elsewhere").mkdir()
    linked.path.symlink_to(tmp_path / "elsewhere")
    assert not remove_empty_scratch(linked, settings, failed=False)  # cleanup_workspace unlinks it
    cleanup_workspace(linked, repo, settings, failed=False)
    assert not linked.path.is_symlink() and (tmp_path / "elsewhere").is_dir()

    keep = settings_for(tmp_path, keep_failed_workspaces=True)
    kept = prepare_workspace(repo, "44444444-d", keep)
    assert remove_empty_scratch(kept, keep, failed=True) and kept.path.is_dir()
    worktree = prepare_workspace(Repo("l", str(make_repo(tmp_path / "r"))), "55555555-e", settings)
    assert not remove_empty_scratch(worktree, settings, failed=False)  # not scratch: not its case


@pytest.mark.parametrize("recovering", [False, True])
def test_a_late_cleanup_leaves_an_in_place_repo_another_job_took(tmp_path: Path, recovering: bool) -> None:
    """A run that was failed by a watchdog while its instance was frozen cleans up once it runs
    again: by then another job may have the folder, on its own branch with its own edits, which the
    reset and checkout threw away. Another job's branch is left alone; and a recovering cleanup (a
    crash's, a lost lease's) touches the repo only while it is on its own job's branch."""
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place")
    first = prepare_workspace(repo, "17171717-a", settings)
    git("checkout", "-q", "-f", "main", cwd=local)  # the first job's recovery put it back ...
    git("checkout", "-q", "-b", "runner/18181818", cwd=local)  # ... and the next job took it
    (local / "README.md").write_text("the next job's work\n")
    cleanup_workspace(first, repo, settings, failed=True, recovering=recovering)
    assert git("symbolic-ref", "--short", "HEAD", cwd=local) == "runner/18181818"
    assert (local / "README.md").read_text() == "the next job's work\n"
    assert git("branch", "--list", first.branch or "", cwd=local) == ""  # its own branch, unchanged: gone


def test_a_recovering_cleanup_leaves_the_operators_branch_alone(tmp_path: Path) -> None:
    """Back on its own branch (another instance's recovery did it), the operator's edits there are
    not the job's: a recovering cleanup leaves them."""
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place")
    ws = prepare_workspace(repo, "19191919-a", settings)
    git("checkout", "-q", "-f", "main", cwd=local)
    (local / "README.md").write_text("the operator's edit\n")
    cleanup_workspace(ws, repo, settings, failed=True, recovering=True)
    assert (local / "README.md").read_text() == "the operator's edit\n"


@pytest.mark.parametrize("mode", ["in_place", "worktree", "clone"])
def test_what_a_prepare_cut_short_left_is_cleaned_up_by_its_names(tmp_path: Path, mode: str) -> None:
    """A crash (or a watchdog's verdict) during the prepare, before the run manifest recorded the
    workspace, left the in_place repo on the job's branch, or the worktree or clone folder and its
    branch, with nothing to say so: recovery skipped the job. The runner's own names find them;
    an in_place repo goes back to the branch checked out before the job's (`@{-1}`)."""
    from codex_runner.execution.workspace import cleanup_unrecorded

    local = make_repo(tmp_path / "repo")
    git("checkout", "-q", "-b", "develop", cwd=local)  # the operator's branch: not the default
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace=mode)
    ws = prepare_workspace(repo, "20202020-a", settings)
    assert cleanup_unrecorded(repo, "20202020-a", mode, settings)
    assert git("symbolic-ref", "--short", "HEAD", cwd=local) == "develop"
    assert git("status", "--porcelain", cwd=local) == ""
    assert git("branch", "--list", "runner/*", cwd=local) == ""
    assert not ws.path.exists() or mode == "in_place"
    assert not cleanup_unrecorded(repo, "20202020-a", mode, settings)  # nothing left: a no-op
    # A prepare that never got to its checkout: the operator's repo, dirty, is left as it is.
    (local / "README.md").write_text("the operator's edit\n")
    assert not cleanup_unrecorded(repo, "21212121-b", "in_place", settings)
    assert (local / "README.md").read_text() == "the operator's edit\n"


def test_a_prepare_cut_short_keeps_a_job_branch_with_commits_and_stashes_what_was_left(
    tmp_path: Path,
) -> None:
    """Cleaned up by its names (no workspace record: the run had another data folder), a job
    branch was deleted whatever it held, and what was left uncommitted was reset away. A branch
    with commits of its own stays, and leftovers go to a stash entry naming the job."""
    from codex_runner.execution.workspace import cleanup_unrecorded

    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place")
    ws = prepare_workspace(repo, "22222222-a", settings)
    (local / "work.txt").write_text("committed by the job\n")
    git("add", "work.txt", cwd=local)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "the job's work", cwd=local)
    (local / "README.md").write_text("left uncommitted\n")
    assert cleanup_unrecorded(repo, "22222222-a", "in_place", settings)
    assert git("symbolic-ref", "--short", "HEAD", cwd=local) == "main"
    assert git("branch", "--list", ws.branch or "", cwd=local).strip("* ") == ws.branch
    stashed = git("stash", "list", cwd=local)
    assert "22222222-a" in stashed and "README.md" in git(
        "stash", "show", "--name-only", "stash@{0}", cwd=local
    )


def test_a_lock_is_not_taken_from_a_git_that_runs_in_the_repo(tmp_path: Path) -> None:
    """A git running a hook or an editor has closed its `index.lock` but still owns it: it looked
    stale and was removed, and that commit then failed."""
    import subprocess

    from codex_runner.execution.gitutil import remove_stale_locks

    from tests.helpers import wait_until

    local = make_repo(tmp_path / "repo")
    lock = local / ".git" / "index.lock"
    lock.write_text("")
    # A git process working in the repo (its current folder there), as during a hook.
    busy = subprocess.Popen(
        ["git", "-c", "alias.nap=!sleep 30", "nap"],
        cwd=local,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: _git_in(local), timeout=10)
        assert remove_stale_locks(local / ".git", local) == [] and lock.exists()
    finally:
        busy.kill()
        busy.wait(timeout=10)
    assert remove_stale_locks(local / ".git", local) == ["index.lock"] and not lock.exists()


def _git_in(folder: Path) -> bool:
    import os

    for entry in os.scandir("/proc"):
        try:
            comm = Path(f"/proc/{entry.name}/comm").read_text()
            if comm.startswith("git") and os.readlink(f"/proc/{entry.name}/cwd") == os.path.realpath(folder):
                return True
        except OSError:
            continue
    return False


def test_a_prepare_cut_short_in_a_repo_without_reflogs_goes_back_to_the_configured_branch(
    tmp_path: Path,
) -> None:
    """With no reflog (`core.logAllRefUpdates=false`), `@{-1}` says nothing: the cleanup failed and
    the repo stayed on the job's branch for good. The repo's configured branch is the fallback."""
    from codex_runner.execution.workspace import cleanup_unrecorded

    local = make_repo(tmp_path / "repo")
    git("config", "core.logAllRefUpdates", "false", cwd=local)
    import shutil

    shutil.rmtree(local / ".git" / "logs", ignore_errors=True)
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place")
    prepare_workspace(repo, "23232323-a", settings)
    assert cleanup_unrecorded(repo, "23232323-a", "in_place", settings)
    assert git("symbolic-ref", "--short", "HEAD", cwd=local) == "main"


def test_a_recovering_cleanup_waits_for_an_index_another_git_holds(tmp_path: Path) -> None:
    """An editor's `git status` polling the repo holds `index.lock` for a moment; `git stash push`
    then fails with no word at all (git 2.39), and the recovery left the repo on the job's branch
    until the next job (found by the in_place crash test, whose own `git status` polled the repo)."""
    import threading
    import time

    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("widgets", str(local), workspace="in_place")
    ws = prepare_workspace(repo, "21212121-a", settings)
    (local / "README.md").write_text("half-done by the job\n")
    lock = local / ".git" / "index.lock"
    # Held open, as a live git holds it: the cleanup's stale-lock sweep must leave it.
    held = open(lock, "w")  # noqa: SIM115 - closed by the thread

    def release() -> None:
        time.sleep(0.5)
        held.close()
        lock.unlink()

    releaser = threading.Thread(target=release, daemon=True)
    releaser.start()
    cleanup_workspace(ws, repo, settings, failed=True, recovering=True)
    releaser.join(timeout=5)
    assert git("symbolic-ref", "--short", "HEAD", cwd=local) == "main"
    assert "left uncommitted on runner/21212121 by job 21212121-a" in git("stash", "list", cwd=local)
    assert git("status", "--porcelain", cwd=local) == ""
