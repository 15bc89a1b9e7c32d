"""execution/sandbox.py: the plan of Landlock rules, and what a confined process can and cannot
reach (real processes, real Landlock where the kernel has it)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codex_runner.config import load_settings
from codex_runner.execution import sandbox
from codex_runner.execution.sandbox import READ_ONLY, JobAccess, job_access, run_confined

FULL = sandbox.handled_rights(sandbox.abi_version() or 1)
needs_landlock = pytest.mark.skipif(sandbox.abi_version() == 0, reason="this kernel has no Landlock")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """base/{data/{secret, ws/}, a/, f, link -> data, alias -> a, store/objects}"""
    base = tmp_path / "base"
    (base / "data" / "ws").mkdir(parents=True)
    (base / "data" / "secret").write_text("secret\n")
    (base / "a").mkdir()
    (base / "a" / "open").write_text("open\n")
    (base / "f").write_text("f\n")
    (base / "link").symlink_to(base / "data")
    (base / "alias").symlink_to(base / "a")
    (base / "data" / "store" / "objects").mkdir(parents=True)
    (base / "data" / "store" / "objects" / "o").write_text("object\n")
    return base


def _rules(hidden: tuple[str, ...]) -> dict[str, int]:
    with sandbox._plans_lock:
        return dict(sandbox._plan(hidden, FULL).rules)


def test_the_plan_grants_every_entry_on_the_way_but_the_way_and_what_leads_into_it(tree: Path) -> None:
    hidden = (str(tree / "data"),)
    rules = _rules(hidden)
    assert rules[str(tree / "a")] == FULL
    assert str(tree / "alias") not in rules  # a link's rule is on its target, opened without following
    assert rules[str(tree / "f")] == FULL & sandbox._FILE_RIGHTS  # a file's rule carries file rights
    for refused in ("data", "link"):
        assert str(tree / refused) not in rules
    # Nothing on the way itself (a rule on a folder covers all beneath it) ...
    assert not [p for p in rules if str(tree).startswith(p.rstrip("/") + "/") or p == str(tree)]
    # ... and everything beside it, from the root down.
    assert "/usr" in rules and str(tree.parent / "base") not in rules


def test_the_plan_is_read_again_once_a_folder_on_the_way_changes(tree: Path) -> None:
    hidden = (str(tree / "data"),)
    assert str(tree / "new") not in _rules(hidden)
    (tree / "new").mkdir()
    assert str(tree / "new") in _rules(hidden)


def test_hidden_paths_are_the_runners_files_wherever_the_settings_put_them(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "RUNNER_DATA_DIR": str(tmp_path / "data"),
            "RUNNER_LOG_DIR": str(tmp_path / "logs"),
            "RUNNER_WORKSPACE_DIR": str(tmp_path / "data" / "ws"),
            "RUNNER_DATABASE_URL": f"sqlite:///{tmp_path / 'db' / 'runner.db'}",
            "RUNNER_JOB_HIDDEN_PATHS": "secrets:/etc/shadow",
        },
        cwd=tmp_path,
    )
    hidden = set(sandbox.hidden_paths(settings))
    assert {str(tmp_path / p) for p in ("data", "logs", "secrets")} <= hidden
    assert {str(tmp_path / "db" / f"runner.db{s}") for s in ("", "-wal", "-shm", "-journal")} <= hidden
    assert "/etc/shadow" in hidden
    assert str(tmp_path / "data" / "ws") not in hidden  # inside the data folder, hidden with it


def test_a_codex_jobs_home_is_granted_to_it_and_hidden_from_others(tmp_path: Path) -> None:
    home = tmp_path / "codex-home"
    settings = load_settings(
        {"RUNNER_DATA_DIR": str(tmp_path / "data"), "RUNNER_CODEX_HOME": str(home)}, cwd=tmp_path
    )
    ws = tmp_path / "data" / "workspaces" / "j"
    plain = job_access(settings, ws, job_id="j")
    assert str(home) in plain.hidden and plain.granted == ((str(ws), 0),)
    codex = job_access(
        settings, ws, store=tmp_path / "m.git", store_rights=READ_ONLY, codex_home=home, job_id="j"
    )
    assert str(home) not in codex.hidden
    assert codex.granted == ((str(ws), 0), (str(tmp_path / "m.git"), READ_ONLY), (str(home), 0))


def _run(access: JobAccess, script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_confined(
        access,
        sandbox.abi_version(),
        lambda: subprocess.run(
            ["/bin/sh", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
        ),
    )


def _verdicts(access: JobAccess, checks: dict[str, str], cwd: Path) -> dict[str, bool]:
    script = "\n".join(
        f'if {cmd} >/dev/null 2>&1; then echo "ok {name}"; else echo "no {name}"; fi'
        for name, cmd in checks.items()
    )
    out = _run(access, script, cwd).stdout.split("\n")
    return {line.split()[1]: line.startswith("ok") for line in out if line}


@needs_landlock
def test_a_confined_process_reaches_all_but_the_hidden_paths(tree: Path) -> None:
    ws, store = tree / "data" / "ws", tree / "data" / "store"
    access = JobAccess((str(tree / "data"),), ((str(ws), 0), (str(store), READ_ONLY)))
    verdicts = _verdicts(
        access,
        {
            "secret": f"cat {tree}/data/secret",
            "via_link": f"cat {tree}/link/secret",
            "list_data": f"ls {tree}/data",
            "beside": f"cat {tree}/a/open",
            "beside_write": f"touch {tree}/a/new",
            "alias": f"cat {tree}/alias/open",
            "own": "echo x > mine && mkdir -p d/e && mv mine d/e/ && cat d/e/mine",
            "store_read": f"cat {store}/objects/o",
            "store_write": f"touch {store}/objects/p",
            "usr": "ls /usr/bin",
            "on_the_way": f"touch {tree}/made-on-the-way",  # the documented limitation
        },
        ws,
    )
    assert verdicts == {
        "secret": False,
        "via_link": False,
        "list_data": False,
        "beside": True,
        "beside_write": True,
        "alias": True,
        "own": True,
        "store_read": True,
        "store_write": False,
        "usr": True,
        "on_the_way": False,
    }


@needs_landlock
def test_the_same_script_unconfined_reaches_them_all(tree: Path) -> None:
    """The control: the checks above can say yes."""
    done = subprocess.run(["cat", str(tree / "data" / "secret"), str(tree / "link" / "secret")], check=False)
    assert done.returncode == 0


@needs_landlock
def test_a_confined_process_cannot_attach_to_or_signal_the_runners_other_processes(tree: Path) -> None:
    """Another job's process, or the runner's own `git push`: same user, but outside the job's
    Landlock domain. Landlock refuses the access modes of an attach (`/proc/<pid>/mem`, `fd/`)
    and, from its ABI 6, signals. (`/proc/<pid>/environ`: the test below.)"""
    other = subprocess.Popen(
        ["sleep", "30"], env={**os.environ, "PUSH_SECRET": "hunter2-abcdef"}, start_new_session=True
    )
    try:
        access = JobAccess((str(tree / "data"),), ((str(tree / "data" / "ws"), 0),))
        verdicts = _verdicts(
            access,
            {
                "mem": f"head -c1 /proc/{other.pid}/mem",
                "fd": f"readlink /proc/{other.pid}/fd/0",
                "signal": f"kill -0 {other.pid}",
                "own_child": "sleep 5 & kill $!",
            },
            tree / "data" / "ws",
        )
        # Unconfined, the same accesses work (the test's own process is the same user).
        assert os.readlink(f"/proc/{other.pid}/fd/0")
        assert verdicts["mem"] is False and verdicts["fd"] is False
        assert verdicts["own_child"] is True
        if sandbox.abi_version() >= 6:
            assert verdicts["signal"] is False
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait(timeout=10)


NOBODY = 65534
SETPRIV = shutil.which("setpriv")


def _as_nobody(argv: list[str]) -> list[str]:
    """`argv` run as an ordinary user: the test's own, or `nobody` when the test runs as root
    (setpriv drops the ids; `no_new_privs` forbids only gaining privileges)."""
    if os.geteuid() != 0:
        return argv
    assert SETPRIV is not None
    return [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


@needs_landlock
@pytest.mark.skipif(os.geteuid() == 0 and SETPRIV is None, reason="as root, needs setpriv to drop to nobody")
def test_a_confined_process_of_an_ordinary_user_cannot_read_another_processs_environment(tree: Path) -> None:
    """`/proc/<pid>/environ` of a process outside the job's domain: another job's (its secret
    variables, codex's API key) or the runner's own. For a runner of its own user, the recommended
    set-up, Landlock refuses it like an attach; run as root, the kernel lets it through (observed on
    Linux 6.18), which docs/execution.md says. The control reads the same file unconfined."""
    secret = "PUSH_SECRET=hunter2-abcdef"
    other = subprocess.Popen(
        _as_nobody(["sleep", "30"]), env={"PATH": os.defpath, "PUSH_SECRET": "hunter2-abcdef"}
    )
    access = JobAccess((str(tree / "data"),), ((str(tree / "data" / "ws"), 0),))
    environ = f"/proc/{other.pid}/environ"
    try:
        deadline = time.monotonic() + 10
        while SETPRIV and os.geteuid() == 0 and os.stat(f"/proc/{other.pid}").st_uid != NOBODY:
            assert time.monotonic() < deadline, "setpriv did not drop to nobody"
            time.sleep(0.01)  # setpriv has not exec'd sleep as nobody yet
        read = _as_nobody(["cat", environ])
        control = subprocess.run(read, capture_output=True, text=True, timeout=30, check=False)
        assert secret in control.stdout
        confined = run_confined(
            access,
            sandbox.abi_version(),
            lambda: subprocess.run(read, capture_output=True, text=True, timeout=30, check=False),
        )
        assert confined.returncode != 0 and secret not in confined.stdout
        assert "Permission denied" in confined.stderr
        # Another job: a process confined in a domain of its own.
        job = run_confined(
            access,
            sandbox.abi_version(),
            lambda: subprocess.Popen(
                _as_nobody(["sleep", "30"]), env={"PATH": os.defpath, "JOB_SECRET": "s3cr3t-9"}
            ),
        )
        try:
            deadline = time.monotonic() + 10
            while os.geteuid() == 0 and os.stat(f"/proc/{job.pid}").st_uid != NOBODY:
                assert time.monotonic() < deadline, "setpriv did not drop to nobody"
                time.sleep(0.01)
            neighbour = run_confined(
                access,
                sandbox.abi_version(),
                lambda: subprocess.run(
                    _as_nobody(["cat", f"/proc/{job.pid}/environ"]),
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                ),
            )
            assert neighbour.returncode != 0 and "JOB_SECRET" not in neighbour.stdout
        finally:
            job.kill()
            job.wait(timeout=10)
    finally:
        other.kill()
        other.wait(timeout=10)


@needs_landlock
def test_confinement_stays_with_the_spawning_thread(tree: Path) -> None:
    """The runner itself is never confined: the thread that applied the rules is gone."""
    access = JobAccess((str(tree / "data"),), ())
    assert _run(access, f"cat {tree}/data/secret", tree / "a").returncode != 0
    assert (tree / "data" / "secret").read_text() == "secret\n"
    assert (
        subprocess.run([sys.executable, "-c", f"open({str(tree / 'data' / 'secret')!r}).read()"]).returncode
        == 0
    )


@pytest.mark.parametrize(
    ("argv", "sandboxed"),
    [
        (["codex", "exec", "--sandbox", "workspace-write", "-"], True),
        (["codex", "exec", "--sandbox=read-only", "-"], True),
        (["codex", "exec", "-"], True),  # codex's own default: read-only
        (["codex", "exec", "--sandbox", "danger-full-access", "-"], False),
        (["codex", "exec", "--sandbox", "workspace-write", "--yolo", "-"], False),
    ],
)
def test_a_codex_run_is_left_to_codex_s_sandbox_when_it_has_one(argv: list[str], sandboxed: bool) -> None:
    """codex's sandbox is bubblewrap, which needs the mounts a Landlock domain forbids."""
    from codex_runner.execution.agents import codex_sandboxes_commands

    assert codex_sandboxes_commands(argv) is sandboxed


def test_a_codex_sandbox_becomes_a_permission_profile_that_hides_the_runners_files() -> None:
    from codex_runner.execution.agents import with_permission_profile

    argv = ["codex", "exec", "--sandbox", "workspace-write", "--json", "-"]
    out = with_permission_profile(argv, "/d/ws/j", ["/d", "/etc/runner.toml"], ["/d/mirrors/r.git"])
    assert out[:2] == ["codex", "exec"] and out[-2:] == ["--json", "-"]
    assert "--sandbox" not in out
    assert out[2:4] == ["-c", 'default_permissions="codex-runner"']
    table = out[5]
    assert table.startswith("permissions.codex-runner.filesystem={")
    for pair in ('"/" = "read"', '"/tmp" = "write"', '"/d" = "none"', '"/etc/runner.toml" = "none"'):
        assert pair in table
    assert '"/d/mirrors/r.git" = "read"' in table and '"/d/ws/j" = "write"' in table
    read_only = with_permission_profile(["codex", "exec", "--sandbox", "read-only", "-"], "/w", ["/d"], [])
    assert "write" not in read_only[5] and '"/w" = "read"' in read_only[5]
    bypass = ["codex", "exec", "--sandbox", "danger-full-access", "-"]
    assert with_permission_profile(bypass, "/w", ["/d"]) == bypass


@needs_landlock
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_mount_point_on_the_way_stays_unmountable(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan keeps its rules' descriptors open between spawns, but not those of mount points:
    one would keep the operator from unmounting it ("target is busy") for as long as the plan."""
    # Kept whatever the number of entries on the way (a test run's temporary folders hold many).
    monkeypatch.setattr(sandbox, "MAX_KEPT_RULES", 1_000_000)
    mnt = tree / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True, timeout=30)
    try:
        access = JobAccess((str(tree / "data"),), ((str(tree / "data" / "ws"), 0),))
        assert _run(access, f"ls {mnt} && echo listed", tree / "data" / "ws").stdout.strip() == "listed"
        with sandbox._plans_lock:
            plan = sandbox._plans[(access.hidden, FULL)]
            assert (str(mnt), FULL) in plan.mounts and plan.attrs
    finally:
        umounted = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=30)
        if umounted.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], timeout=30)
    assert umounted.returncode == 0, umounted.stderr


def test_no_grant_leads_into_the_runners_own_areas_but_the_jobs_workspace(tmp_path: Path) -> None:
    """An in_place repo (or a local repo's git folder) that a link made to lead into another
    job's workspace or the logs must not open them to this job."""
    settings = load_settings({"RUNNER_DATA_DIR": str(tmp_path / "data")}, cwd=tmp_path)
    root = settings.workspace_dir
    (root / "other").mkdir(parents=True)
    (tmp_path / "repo-link").symlink_to(root / "other")
    own = job_access(settings, root / "j1", job_id="j1")
    assert own.granted[0] == (str(root / "j1"), 0)
    with pytest.raises(sandbox.ConfinementFailed, match="lies in the runner's own files"):
        job_access(settings, tmp_path / "repo-link", job_id="j1")
    with pytest.raises(sandbox.ConfinementFailed):
        job_access(settings, settings.log_dir, job_id="j1")
    with pytest.raises(sandbox.ConfinementFailed):
        job_access(settings, root / "j1", store=root / "other" / ".git", job_id="j1")
    mirror = settings.mirrors_dir / "r.git"
    assert job_access(settings, root / "j1", store=mirror, store_rights=READ_ONLY, job_id="j1").granted[
        1
    ] == (
        str(mirror),
        READ_ONLY,
    )
    demo = settings.data_dir / "demo" / "demo-repo" / ".git"  # a repo the operator keeps there
    assert job_access(settings, root / "j1", store=demo, job_id="j1").granted[1] == (str(demo), 0)
