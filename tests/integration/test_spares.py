"""Warm workspaces with real git: a spare is made after a job's prepare, the next job of the repo and
mode takes it, and what it gets is exactly a fresh checkout of its base commit on its branch — also
when the base moved, when someone tampered with the spare, or when the spare is broken."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_git_workspace import Repo, commit, git, make_repo, settings_for

from codex_runner.config import ConfigError, Settings, load_settings
from codex_runner.execution import spares
from codex_runner.execution.git import GitError
from codex_runner.execution.spare_watch import watch
from codex_runner.execution.spares import pool_dir, stop_refills, wait_for_refills
from codex_runner.execution.workspace import (
    Workspace,
    cleanup_workspace,
    lock_key,
    prepare_workspace,
    prewarm_spares,
)

pytestmark = pytest.mark.timeout(60)


def ready_spares(settings: Settings, repo: Repo) -> list[Path]:
    pool = pool_dir(settings, lock_key(repo.source), repo.workspace)
    return sorted(pool.glob("ready-*")) if pool.is_dir() else []


def assert_pristine(ws: Workspace, seed: Path) -> None:
    """The workspace is on its job branch at the base commit, with exactly the base's files."""
    assert ws.branch is not None and ws.base_commit is not None
    assert git("symbolic-ref", "--short", "HEAD", cwd=ws.path) == ws.branch
    assert git("rev-parse", "HEAD", cwd=ws.path) == ws.base_commit
    assert git("status", "--porcelain", "--ignored", "--untracked-files=all", cwd=ws.path) == ""
    expected = git("ls-tree", "-r", "--name-only", ws.base_commit, cwd=seed).splitlines()
    on_disk = sorted(
        str(p.relative_to(ws.path)) for p in ws.path.rglob("*") if p.is_file() and ".git" not in p.parts
    )
    assert on_disk == sorted(expected)
    for name in expected:
        assert (ws.path / name).read_bytes() == git_blob(seed, ws.base_commit, name)


def git_blob(repo: Path, commit: str, name: str) -> bytes:
    return subprocess.run(
        ["git", "show", f"{commit}:{name}"], cwd=repo, capture_output=True, check=True
    ).stdout


def advance(seed: Path) -> str:
    """A new base commit that changes, deletes and adds files."""
    (seed / "README.md").write_text("hello\nagain\n")
    (seed / "src/app.py").unlink()
    (seed / "docs").mkdir(exist_ok=True)
    (seed / "docs/new.md").write_text("new\n")
    git("add", "-A", cwd=seed)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "move", cwd=seed)
    return git("rev-parse", "HEAD", cwd=seed)


def url_repo(
    tmp_path: Path, mode: str, files: dict[str, str] | None = None
) -> tuple[Path, Path, Settings, Repo]:
    """A seed repo, its bare copy served as a `file://` URL repo in `mode`, and the runner's settings."""
    seed = make_repo(tmp_path / "seed", files)
    bare = tmp_path / "origin.git"
    git("clone", "-q", "--bare", str(seed), str(bare))
    repo = Repo("r", f"file://{bare}", source_type="git_url", branch="main", workspace=mode)
    return seed, bare, settings_for(tmp_path), repo


@pytest.fixture(autouse=True)
def _no_refill_leftovers() -> Iterator[None]:
    yield
    stop_refills(timeout=30)


@pytest.fixture(params=["checked", "watched"])
def takes(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[bool, list[bool]]]:
    """Runs a test both ways a spare can be taken: checked file by file (what a small tree like the
    ones here gets), or trusted because it was watched since the build checked it (what a big tree
    gets: forced here by lowering the size threshold). Yields (watched, what each take decided)."""
    watched = request.param == "watched"
    if watched:
        monkeypatch.setattr(spares, "_SETTLE_MIN_INDEX_BYTES", 0)
    decided: list[bool] = []
    original = watch.take

    def take(root: Path) -> bool:
        decided.append(original(root))
        return decided[-1]

    monkeypatch.setattr(watch, "take", take)
    yield watched, decided


@pytest.mark.parametrize("mode", ["worktree", "clone"])
def test_second_job_takes_the_spare_made_after_the_first(
    tmp_path: Path, mode: str, takes: tuple[bool, list[bool]]
) -> None:
    seed, _bare, settings, repo = url_repo(tmp_path, mode)

    first = prepare_workspace(repo, "11111111-a", settings)
    assert wait_for_refills(30)
    [spare] = ready_spares(settings, repo)
    (first.path / "agent.txt").write_text("the first job's work\n")  # never seen by the second

    second = prepare_workspace(repo, "22222222-b", settings)
    assert not spare.exists()  # taken: renamed into the second job's workspace
    assert takes[1] == [takes[0]]  # a watched spare nobody touched is trusted as it is
    assert second.path == settings.workspace_dir.resolve() / "22222222-b"
    assert_pristine(second, seed)
    if mode == "clone":
        assert git("config", "--get", "remote.origin.url", cwd=second.path) == repo.source
        assert git("rev-parse", "refs/remotes/origin/main", cwd=second.path) == second.base_commit
    else:
        assert second.git_dir is not None and second.git_dir.parent == second.store / "worktrees"

    # The taken spare is a normal workspace: commit, cleanup and the kept branch work as usual, and
    # git sees what the agent changes (the trusted take leaves no fsmonitor data that hides a change).
    (second.path / "feature.txt").write_text("x\n")
    (second.path / "README.md").write_text("changed by the agent\n")
    # What the agent's own git (default configuration) shows, then what the runner commits.
    assert git("diff", "--name-only", cwd=second.path) == "README.md"
    assert git("ls-files", "--others", cwd=second.path) == "feature.txt"
    assert commit(second).files_changed == 2
    assert wait_for_refills(30)
    assert len(ready_spares(settings, repo)) == 1  # refilled for the job after
    cleanup_workspace(first, repo, settings, failed=False)
    cleanup_workspace(second, repo, settings, failed=False)
    assert not second.path.exists()
    assert git("rev-parse", "--verify", "refs/heads/runner/22222222", cwd=second.store)


@pytest.mark.parametrize("mode", ["worktree", "clone"])
def test_a_spare_follows_the_base_when_it_moved(
    tmp_path: Path, mode: str, takes: tuple[bool, list[bool]]
) -> None:
    seed, bare, settings, repo = url_repo(tmp_path, mode)
    prepare_workspace(repo, "11111111-a", settings)
    assert wait_for_refills(30) and ready_spares(settings, repo)

    [spare] = ready_spares(settings, repo)
    moved = advance(seed)
    git("push", "-q", str(bare), "main", cwd=seed)
    second = prepare_workspace(repo, "22222222-b", settings)
    assert not spare.exists()
    assert takes[1] == [takes[0]]
    assert second.base_commit == moved
    assert_pristine(second, seed)
    assert not (second.path / "src/app.py").exists()


def test_a_clone_spare_gets_the_remote_branch_of_a_nested_base(tmp_path: Path) -> None:
    """The remote-tracking ref of a base branch with a slash is made as `git clone` would have it."""
    seed = make_repo(tmp_path / "seed")
    git("branch", "release/1.x", cwd=seed)
    bare = tmp_path / "origin.git"
    git("clone", "-q", "--bare", str(seed), str(bare))
    repo = Repo("r", f"file://{bare}", source_type="git_url", branch="release/1.x", workspace="clone")
    settings = settings_for(tmp_path)
    prepare_workspace(repo, "11111111-a", settings)
    assert wait_for_refills(30)
    [spare] = ready_spares(settings, repo)
    second = prepare_workspace(repo, "22222222-b", settings)
    assert not spare.exists()  # taken
    assert git("rev-parse", "refs/remotes/origin/release/1.x", cwd=second.path) == second.base_commit
    assert git("for-each-ref", "--format=%(refname)", "refs/remotes", cwd=second.path) == (
        "refs/remotes/origin/release/1.x"
    )
    assert_pristine(second, seed)


@pytest.mark.parametrize("mode", ["worktree", "clone"])
def test_a_tampered_spare_is_made_pristine(tmp_path: Path, mode: str, takes: tuple[bool, list[bool]]) -> None:
    seed, _bare, settings, repo = url_repo(
        tmp_path, mode, files={"README.md": "hello\n", ".gitignore": "*.log\n", "a/b.txt": "b\n"}
    )
    prepare_workspace(repo, "11111111-a", settings)
    assert wait_for_refills(30)
    [spare] = ready_spares(settings, repo)

    # Whatever a process of the same user could do to a spare while it waits.
    (spare / "README.md").write_text("planted\n")
    (spare / "a/b.txt").unlink()
    (spare / "planted.py").write_text("import os\n")
    (spare / "debug.log").write_text("ignored but planted\n")
    (spare / "a/deep").mkdir()
    (spare / "a/deep/x").write_text("x\n")
    evil = tmp_path / "evil.git"
    git("init", "-q", "--bare", str(evil))
    if mode == "clone":
        (spare / ".git/config").write_text(f'[remote "origin"]\n\turl = {evil}\n[core]\n\tbare = false\n')
        (spare / ".git/objects/info/alternates").write_text(f"{evil}/objects\n")

    second = prepare_workspace(repo, "22222222-b", settings)
    assert not spare.exists()  # the tampered spare was the one taken
    assert takes[1] == [False]  # watched or not, it is checked file by file
    assert_pristine(second, seed)
    if mode == "clone":
        assert git("config", "--get", "remote.origin.url", cwd=second.path) == repo.source
        assert str(evil) not in (second.path / ".git/objects/info/alternates").read_text()


@pytest.mark.parametrize("mode", ["worktree", "clone"])
def test_a_tampered_spare_is_made_pristine_when_the_base_moved_too(
    tmp_path: Path, mode: str, takes: tuple[bool, list[bool]]
) -> None:
    """The untracked files go before the checkout to the new base (while the fetch runs): a planted
    file at a path the new base adds, or in a folder it deletes, must not survive either."""
    seed, bare, settings, repo = url_repo(tmp_path, mode)
    prepare_workspace(repo, "11111111-a", settings)
    assert wait_for_refills(30)
    [spare] = ready_spares(settings, repo)
    (spare / "docs").mkdir()
    (spare / "docs/new.md").write_text("planted where the new base adds a file\n")
    (spare / "src/planted.py").write_text("beside a file the new base deletes\n")
    (spare / "README.md").write_text("modified\n")

    advance(seed)
    git("push", "-q", str(bare), "main", cwd=seed)
    second = prepare_workspace(repo, "22222222-b", settings)
    assert not spare.exists()
    assert takes[1] == [False]
    assert_pristine(second, seed)
    assert (second.path / "docs/new.md").read_text() == "new\n"
    assert not (second.path / "src").exists()


@pytest.mark.parametrize("mode", ["worktree", "clone"])
def test_a_failed_fetch_keeps_the_spare_and_leaves_no_workspace(tmp_path: Path, mode: str) -> None:
    seed, bare, settings, repo = url_repo(tmp_path, mode)
    first = prepare_workspace(repo, "11111111-a", settings)
    assert wait_for_refills(30)
    [spare] = ready_spares(settings, repo)
    moved = bare.with_name("moved.git")
    bare.rename(moved)  # the remote is gone: the fetch fails

    with pytest.raises(GitError) as info:
        prepare_workspace(repo, "22222222-b", settings)
    assert info.value.code == "clone_failed"
    assert spare.exists()  # claimed only once the job's commit is known
    assert not (settings.workspace_dir / "22222222-b").exists()
    assert first.store is not None
    assert "22222222-b" not in git("--git-dir", str(first.store), "worktree", "list", "--porcelain")

    moved.rename(bare)  # back: the next job takes the spare
    third = prepare_workspace(repo, "33333333-c", settings)
    assert not spare.exists()
    assert_pristine(third, seed)


def test_a_broken_spare_is_dropped_and_the_job_prepares_the_usual_way(tmp_path: Path) -> None:
    seed, _bare, settings, repo = url_repo(tmp_path, "worktree")
    prepare_workspace(repo, "11111111-a", settings)
    assert wait_for_refills(30)
    [spare] = ready_spares(settings, repo)
    (spare / ".git").unlink()  # no longer a worktree of anything
    (spare / ".git").write_text("gitdir: /nowhere\n")

    second = prepare_workspace(repo, "22222222-b", settings)
    assert_pristine(second, seed)
    assert second.git_dir is not None and second.git_dir.parent == second.store / "worktrees"
    assert not spare.exists()


def test_local_worktree_repo_has_spares_too(tmp_path: Path) -> None:
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("l", str(local))
    first = prepare_workspace(repo, "11111111-a", settings)
    assert wait_for_refills(30) and ready_spares(settings, repo)
    [spare] = ready_spares(settings, repo)
    advance(local)
    second = prepare_workspace(repo, "22222222-b", settings)
    assert not spare.exists()
    assert_pristine(second, local)
    cleanup_workspace(first, repo, settings, failed=False)
    cleanup_workspace(second, repo, settings, failed=False)
    assert git("status", "--porcelain", cwd=local) == ""


def test_local_clone_repo_has_spares_that_own_their_objects(
    tmp_path: Path, takes: tuple[bool, list[bool]]
) -> None:
    """A local repo in `clone` mode: the spare is a hard-linked clone like the job's own, and the
    take fetches what the repo gained since the build. The workspace never borrows the repo's
    objects, even when someone pointed the spare at another object store."""
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("l", str(local), workspace="clone")
    first = prepare_workspace(repo, "11111111-a", settings)
    assert wait_for_refills(30)
    [spare] = ready_spares(settings, repo)
    assert git("for-each-ref", "refs/heads/", cwd=spare) == ""  # no branch as old as the spare
    (spare / ".git" / "objects" / "info" / "alternates").write_text(f"{local / '.git' / 'objects'}\n")
    moved = advance(local)  # a commit the spare's objects do not have
    git("branch", "feature", cwd=local)

    second = prepare_workspace(repo, "22222222-b", settings)
    assert not spare.exists()
    assert takes[1] == [takes[0]]
    assert second.base_commit == moved
    assert_pristine(second, local)
    assert not (second.path / ".git" / "objects" / "info" / "alternates").exists()
    assert git("config", "--get", "remote.origin.url", cwd=second.path) == str(local)
    assert git("rev-parse", "refs/remotes/origin/main", cwd=second.path) == moved
    assert git("rev-parse", "refs/remotes/origin/feature", cwd=second.path) == moved
    # Independent of the repo: its objects may go, the workspace still has every one.
    shutil.rmtree(local / ".git" / "objects")
    assert git("fsck", "--connectivity-only", cwd=second.path) == ""
    git("init", "-q", "-b", "main", str(local))  # an empty repo again, so cleanup can run
    (second.path / "agent.txt").write_text("work\n")
    assert commit(second).files_changed == 1
    cleanup_workspace(first, repo, settings, failed=True)
    assert wait_for_refills(30)


def test_a_local_clone_spare_has_the_repos_tags_as_they_are_now(tmp_path: Path) -> None:
    """The take's `fetch --prune --tags` kept a tag the repo deleted since the build (`--prune`
    does not prune tags fetched with `--tags`): a fresh clone does not have it."""
    local = make_repo(tmp_path / "repo")
    git("tag", "old-release", cwd=local)
    git("tag", "moving", cwd=local)
    settings = settings_for(tmp_path)
    repo = Repo("l", str(local), workspace="clone")
    first = prepare_workspace(repo, "11111111-a", settings)
    assert wait_for_refills(30)
    [spare] = ready_spares(settings, repo)
    git("tag", "-d", "old-release", cwd=local)
    second = prepare_workspace(repo, "22222222-b", settings)
    assert not spare.exists()  # taken
    assert git("tag", cwd=second.path).split() == ["moving"]
    cleanup_workspace(second, repo, settings, failed=False)
    cleanup_workspace(first, repo, settings, failed=False)
    assert wait_for_refills(30)


def test_a_local_clone_spare_has_origin_head_as_a_fresh_clone(tmp_path: Path) -> None:
    """`origin/HEAD` was fixed when the spare was built: after the repo switched its branch and
    deleted the old one, the job's clone named a dangling `origin/HEAD`, where a fresh clone names
    the repo's current branch."""
    local = make_repo(tmp_path / "repo")
    git("branch", "dev", cwd=local)
    settings = settings_for(tmp_path)
    repo = Repo("l", str(local), branch=None, workspace="clone")
    first = prepare_workspace(repo, "11111111-a", settings)
    assert wait_for_refills(30)
    [spare] = ready_spares(settings, repo)
    cleanup_workspace(first, repo, settings, failed=False)
    git("checkout", "-q", "dev", cwd=local)
    git("branch", "-D", "main", cwd=local)
    second = prepare_workspace(repo, "22222222-b", settings)
    assert not spare.exists()  # taken
    assert git("symbolic-ref", "refs/remotes/origin/HEAD", cwd=second.path) == "refs/remotes/origin/dev"
    cleanup_workspace(second, repo, settings, failed=False)
    assert wait_for_refills(30)


def test_two_jobs_racing_for_one_spare_both_get_a_workspace(tmp_path: Path) -> None:
    seed, _bare, settings, repo = url_repo(tmp_path, "worktree")
    prepare_workspace(repo, "11111111-a", settings)
    assert wait_for_refills(30) and len(ready_spares(settings, repo)) == 1

    got: dict[str, Workspace] = {}
    errors: list[BaseException] = []

    def job(job_id: str) -> None:
        try:
            got[job_id] = prepare_workspace(repo, job_id, settings)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(f"{i}{i}{i}{i}{i}{i}{i}{i}-x",)) for i in range(2, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(got) == 4
    for ws in got.values():
        assert_pristine(ws, seed)
    assert len({ws.git_dir for ws in got.values()}) == 4


def test_spares_off_leaves_no_pool(tmp_path: Path) -> None:
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path, warm_workspaces=0)
    repo = Repo("l", str(local))
    ws = prepare_workspace(repo, "11111111-a", settings)
    assert wait_for_refills(30)
    assert not (settings.workspace_dir / ".spares").exists()
    cleanup_workspace(ws, repo, settings, failed=False)
    assert git("worktree", "list", "--porcelain", cwd=local).count("worktree ") == 1


def test_interrupted_builds_are_swept(tmp_path: Path) -> None:
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path)
    repo = Repo("l", str(local))
    pool = pool_dir(settings, lock_key(repo.source), "worktree")
    pool.mkdir(parents=True)
    leftover = pool / "building-0123456789ab"
    leftover.mkdir()
    (leftover / "half.txt").write_text("x")
    os.utime(leftover, (0, 0))
    fresh = pool / "building-ba9876543210"  # a build in progress elsewhere: kept
    fresh.mkdir()
    prepare_workspace(repo, "11111111-a", settings)
    assert wait_for_refills(30)
    assert not leftover.exists() and fresh.exists()
    assert len(ready_spares(settings, repo)) == 1


def test_a_spare_past_the_setting_is_claimed_before_it_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spares past RUNNER_WARM_WORKSPACES go, but each is first renamed out of `ready-` (as a take
    renames it): a job that took one a moment before keeps it whole, and no deletion ever runs on
    a folder a take may rename into a job's workspace."""
    local = make_repo(tmp_path / "repo")
    settings = settings_for(tmp_path, warm_workspaces=1)
    src = spares.SpareSource(
        key=lock_key(str(local)), mode="clone", store=local / ".git", origin=str(local), commit="x"
    )
    pool = pool_dir(settings, src.key, "clone")
    pool.mkdir(parents=True)
    for name in ("ready-1", "ready-2", "ready-3"):
        (pool / name).mkdir()
        (pool / name / "work.txt").write_text(name)
    taken = tmp_path / "job-workspace"
    real_rename = spares._rename
    deleted: list[str] = []

    def rename(spare: Path, path: Path) -> bool:
        if spare.name == "ready-2":
            os.rename(spare, taken)  # a job's take wins the race for this one
        return real_rename(spare, path)

    real_discard = spares._discard

    def discard(settings: Settings, src: spares.SpareSource, path: Path, home: Path | None) -> None:
        deleted.append(path.name)
        real_discard(settings, src, path, home)

    monkeypatch.setattr(spares, "_rename", rename)
    monkeypatch.setattr(spares, "_discard", discard)
    spares._sweep(settings, src, pool)
    assert sorted(os.listdir(pool)) == ["ready-1"]
    assert (taken / "work.txt").read_text() == "ready-2"
    assert len(deleted) == 1 and deleted[0].startswith("discard-")


def test_warm_workspaces_setting_is_bounded(tmp_path: Path) -> None:
    assert (
        load_settings(env={"RUNNER_DATA_DIR": str(tmp_path), "RUNNER_WARM_WORKSPACES": "3"}).warm_workspaces
        == 3
    )
    with pytest.raises(ConfigError, match="RUNNER_WARM_WORKSPACES"):
        load_settings(env={"RUNNER_DATA_DIR": str(tmp_path), "RUNNER_WARM_WORKSPACES": "17"})
    with pytest.raises(ConfigError, match="RUNNER_WARM_WORKSPACES"):
        load_settings(env={"RUNNER_DATA_DIR": str(tmp_path), "RUNNER_WARM_WORKSPACES": "-1"})


def test_prewarm_at_start_makes_spares_from_what_is_already_here(tmp_path: Path) -> None:
    """After a restart the pools may be empty (swept, or a new workspace dir): the launcher asks for a
    spare of each repo whose objects are here, so the first job does not write its whole tree."""
    local = make_repo(tmp_path / "local")
    seed, bare, settings, url = url_repo(tmp_path, "clone")
    local_repo = Repo("l", str(local))
    local_clone = Repo("c", str(local), workspace="clone")
    prepare_workspace(url, "11111111-a", settings)  # an earlier life made the mirror
    assert wait_for_refills(30)
    for spare in ready_spares(settings, url):
        shutil.rmtree(spare)

    assert prewarm_spares([local_repo, url, local_clone], settings) == 3
    assert wait_for_refills(30)
    assert len(ready_spares(settings, local_repo)) == 1 and len(ready_spares(settings, url)) == 1
    assert len(ready_spares(settings, local_clone)) == 1
    assert not list((settings.data_dir / "git-home").glob("prewarm-*"))  # its git HOME is gone

    moved = advance(seed)
    git("push", "-q", str(bare), "main", cwd=seed)
    [spare] = ready_spares(settings, url)
    second = prepare_workspace(url, "22222222-b", settings)
    assert not spare.exists() and second.base_commit == moved
    assert_pristine(second, seed)
    [local_spare] = ready_spares(settings, local_repo)
    third = prepare_workspace(local_repo, "33333333-c", settings)
    assert not local_spare.exists()
    assert_pristine(third, local)


def test_prewarm_skips_what_it_cannot_make_without_the_network(tmp_path: Path) -> None:
    local = make_repo(tmp_path / "local")
    settings = settings_for(tmp_path)
    repos = [
        Repo("u", f"file://{tmp_path}/nowhere.git", source_type="git_url", workspace="clone"),  # no mirror
        Repo("n", f"file://{tmp_path}/other.git", source_type="git_url", branch=None, workspace="clone"),
        Repo("s", str(local), workspace="scratch"),
        Repo("i", str(local), workspace="in_place"),
        Repo("m", str(tmp_path / "missing")),
    ]
    assert prewarm_spares(repos, settings) == 0
    off = settings_for(tmp_path, warm_workspaces=0)
    assert prewarm_spares([Repo("l", str(local))], off) == 0
    assert wait_for_refills(30)
    assert not (settings.workspace_dir / ".spares").exists()


def test_no_spare_is_asked_for_after_a_stop_until_resumed(tmp_path: Path) -> None:
    """The stop re-armed the background at once: a job's prepare that outlived the launcher's
    stop (stuck on a repo lock past the grace) started a spare build after shutdown, on a thread
    that holds the process's exit."""
    _seed, _bare, settings, repo = url_repo(tmp_path, "clone")
    stop_refills(timeout=5)
    prepare_workspace(repo, "11111111-a", settings)  # asks for a spare
    assert spares._background._thread is None and spares._background._pending == {}
    assert wait_for_refills(5) and ready_spares(settings, repo) == []
    spares.resume_refills()  # the next launcher's start
    prepare_workspace(repo, "22222222-b", settings)
    assert wait_for_refills(30) and len(ready_spares(settings, repo)) == 1


def test_a_stop_ends_a_build_waiting_for_a_repo_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build waiting for a lock a job holds waited up to the lock timeout (40 minutes) after the
    stop, on a non-daemon thread: the process could not exit meanwhile."""
    from codex_runner.execution import workspace
    from codex_runner.execution.gitutil import repo_lock

    _seed, _bare, settings, repo = url_repo(tmp_path, "worktree")  # its build takes the lock
    asked: list[spares.SpareSource] = []
    monkeypatch.setattr(workspace, "refill_later", lambda _settings, src: asked.append(src))
    prepare_workspace(repo, "11111111-a", settings)
    assert wait_for_refills(30)  # the mirror's upkeep
    [source] = asked
    with repo_lock(settings, lock_key(repo.source)):
        spares.refill_later(settings, source)
        assert not wait_for_refills(0.5)  # the build waits for the lock
        started = time.monotonic()
        stop_refills(timeout=10)
        assert time.monotonic() - started < 2
        assert spares._background._thread is None
    assert ready_spares(settings, repo) == []
