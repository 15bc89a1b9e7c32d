"""Jobs that run the machine out of something, for real on a small scale: a disk of a few MiB
(tmpfs, so these tests need root to mount it), memory (only the OOM killer's preference is read,
nothing is exhausted), file descriptors, processes. The promises (SPEC §3, docs/failure-modes.md):
no job lost or run twice, no orphan, the runner keeps serving, and recovers without a restart."""

from __future__ import annotations

import json
import os
import pwd
import random
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import fail_elsewhere_when_the_script_ends, terminal_manifest, wait_until
from tests.integration.conftest import Runner

MountSmall = Callable[[Path, str], Path]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite in the data folder, so that a full data disk is a full database disk too."""
    return f"sqlite:///{tmp_path / 'data' / 'runner.db'}"


@pytest.fixture
def small_disk() -> Iterator[MountSmall]:
    """Mounts a tmpfs of the given size on a folder (made if missing); unmounted at teardown, after
    the runner that uses it closed (request this fixture before `runner_factory`)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, timeout=30
        )
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], timeout=30)  # still busy: detach it


def _fill(hog: Path, marker: Path) -> str:
    """A script that fills the disk of `hog` (dd stops at ENOSPC) and says so in `marker`."""
    return f'["/bin/sh", "-c", "dd if=/dev/zero of={hog} bs=1M count=128 2>/dev/null; touch {marker}"]'


def _filling_runner(runner_factory: Callable[..., Runner], hog: Path, marker: Path, **env: str) -> Runner:
    """A runner with a `fill` script (`_fill`). Its job writes into the runner's data folder, which
    job isolation (Landlock) keeps every job out of: this tool of the tests runs with it off."""
    return runner_factory(
        extra_toml=f"\n[scripts.fill]\ncommand = {_fill(hog, marker)}\n", RUNNER_JOB_ISOLATION="off", **env
    )


def test_a_full_database_disk_delays_statuses_and_loses_none(
    tmp_path: Path, small_disk: MountSmall, runner_factory: Callable[..., Runner], out: Path
) -> None:
    """SQLite answers SQLITE_FULL ("database or disk is full") when its disk fills. That was no
    transient error: the API answered 500, the terminal write of a job that ended meanwhile failed,
    so did its internal-error fallback, and the job stayed `running`; the heartbeats failed
    too, and once space came back the watchdog failed every job of the instance as
    `heartbeat_stale` (and killed the one still running). Now it is an outage like a database
    that does not answer: 503 `unavailable`, and each job gets its own status once space is back."""
    data = small_disk(tmp_path / "data", "24m")
    hog, marker = data / "hog", out / "filled"
    runner = _filling_runner(runner_factory, hog, marker)
    long = runner.submit({"sleep": "10"})
    runner.wait(long["id"], statuses={"running"}, timeout=15)
    fill = runner.submit({}, script="fill")
    assert wait_until(marker.exists, timeout=20)
    filled_at = time.monotonic()
    refused = runner.client.post(
        "/api/runner/jobs", json={"repo": "scratch", "script_key": "behave", "args": {}}
    )
    assert refused.status_code == 503, refused.text
    assert refused.json() == {"code": "unavailable", "detail": "the database's disk is full; try again later"}
    assert runner.client.get("/healthz").status_code == 200
    # Full for longer than RUNNER_STALE_AFTER_SECONDS (5 s here): no heartbeat landed meanwhile.
    time.sleep(max(0.0, filled_at + 6 - time.monotonic()))
    assert runner.job(fill["id"])["status"] == "running"  # its end is not written yet, nor lost
    hog.unlink()
    done = runner.wait(fill["id"], timeout=30)
    assert (done["status"], done["exit_code"], done["error_code"]) == ("success", 0, None), done
    still = runner.wait(long["id"], timeout=30)
    assert (still["status"], still["exit_code"], still["error_code"]) == ("success", 0, None), still
    # Back without a restart: new jobs run, and the manifests are whole.
    after = runner.wait(runner.submit({})["id"], timeout=30)
    assert after["status"] == "success"
    runs = runner.runtime.settings.runs_dir
    for job in (done, still, after):
        assert terminal_manifest(runs, job["id"])["status"] == "success"  # published after the status
    assert not [p.name for p in runs.rglob("*") if p.name.endswith(".tmp")]


def _oom_score_adj(pid: int | str) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def test_a_job_is_the_oom_killers_first_choice_not_the_runner(
    tmp_path: Path, runner_factory: Callable[..., Runner], out: Path
) -> None:
    """Job processes had the runner's oom_score_adj (inherited): when a job ran the machine out of
    memory the kernel weighed the runner, with every other job's supervision, like the job. The
    leader now gets a higher one right after the spawn, and whatever it starts inherits it."""
    runner = runner_factory()
    own = _oom_score_adj("self")
    pids = out / "pids"
    job = runner.submit({"sleep": "30", "grandchild": True, "pids": str(pids)})
    assert wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 2, timeout=15)
    leader, grandchild = map(int, pids.read_text().split())
    try:
        assert _oom_score_adj(leader) == _oom_score_adj(grandchild) == min(1000, max(500, own + 500))
        assert _oom_score_adj("self") == own  # the runner's own is left alone
        # And no descriptor of the runner's (database, sockets, other jobs' pipes) is inherited.
        assert sorted(os.listdir(f"/proc/{leader}/fd")) == ["0", "1", "2"]
    finally:
        runner.client.post(f"/api/runner/jobs/{job['id']}/cancel")
    assert runner.wait(job["id"], timeout=30)["status"] == "canceled"


def _soft_nofile(pid: int) -> int:
    line = next(
        x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max open files")
    )
    return int(line.split()[3])


def test_a_job_gets_the_open_file_limit_the_runner_started_with(
    tmp_path: Path, runner_factory: Callable[..., Runner], monkeypatch: pytest.MonkeyPatch, out: Path
) -> None:
    """`serve` raises its soft open-file limit for its HTTP connections (ops/fdlimit.py); jobs
    inherited the raised one, and a program of theirs that uses select() breaks on a descriptor
    over 1023 (why the usual soft limit is 1024). The leader gets the limit back right after the
    spawn, and its children inherit it."""
    from codex_runner.execution import limits
    from codex_runner.ops.fdlimit import raise_fd_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 8192:
        pytest.skip(f"the hard open-file limit ({hard}) leaves no room to raise the soft one")
    monkeypatch.setattr(
        limits, "_job_nofile", None, raising=False
    )  # what this test's raise records goes with it
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        runner = runner_factory()
        assert raise_fd_limit(runner.runtime.settings).soft > 1024
        pids = out / "pids"
        job = runner.submit({"sleep": "30", "grandchild": True, "pids": str(pids)})
        assert wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 2, timeout=15)
        leader, grandchild = map(int, pids.read_text().split())
        try:
            assert _soft_nofile(leader) == _soft_nofile(grandchild) == 1024
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 1024  # the runner keeps its own
        finally:
            runner.client.post(f"/api/runner/jobs/{job['id']}/cancel")
        assert runner.wait(job["id"], timeout=30)["status"] == "canceled"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_log_write_cut_short_by_a_full_disk_still_counts(tmp_path: Path, small_disk: MountSmall) -> None:
    """A write that fills the disk lands in part (the kernel takes what fits), then ENOSPC. The
    part was not counted: the writer thought the file ended where the last whole write did, at a
    line's end, so its next runner line was glued to the cut one (`xxx[runner] job ending …`),
    and its size, the cap and the line starts it truncates to were off by that part."""
    from codex_runner.logs.writer import LogWriter

    disk = small_disk(tmp_path / "logs", "1m")
    hog = disk / "hog"
    hog.write_bytes(b"\0" * 512 * 1024)
    path = disk / "job.log"
    writer = LogWriter(path, max_bytes=64 * 1024 * 1024)
    chunk = b"y" * 99 + b"\n"
    with pytest.raises(OSError):
        for _ in range(100_000):  # a bound: 1 MiB is full long before
            writer.write(chunk * 655)  # 65,500 bytes: no write ends on a page boundary
    assert writer.bytes_written == path.stat().st_size
    hog.unlink()  # space is back
    writer.runner_line("job ending: success")
    writer.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[-2] == b"[runner] job ending: success" and lines[-1] == b""
    assert lines[-3] == chunk[:-1]  # the line the full disk cut is gone, the whole ones stay


def test_an_audit_line_a_full_disk_cuts_leaves_no_torn_record(tmp_path: Path, small_disk: MountSmall) -> None:
    """A write to a nearly full disk takes what fits and returns short, with no error. The audit
    log wrote each line with one `os.write` and did not look at the count: the cut line stayed
    without its end, the next line (once space was back) was glued to it, and the JSON-lines file
    had two records no reader could parse. Now the cut part is removed and the write fails
    (`audit_write_failed`, as for any other failed audit write)."""
    from codex_runner.ops.audit import AuditLog

    disk = small_disk(tmp_path / "audit", "1m")
    hog = disk / "hog"
    hog.write_bytes(b"\0" * (1024 * 1024 - 8192))  # two pages left
    audit = AuditLog(disk / "audit.jsonl")
    with pytest.raises(OSError):
        audit.write("job_created", job_id="j1", message="m" * 65536)
    hog.unlink()
    audit.write("job_created", job_id="j2", message="after")
    records = [json.loads(line) for line in (disk / "audit.jsonl").read_text().splitlines()]
    assert [r["job_id"] for r in records] == ["j2"]


def test_a_log_can_be_read_while_its_disk_is_full(
    tmp_path: Path, small_disk: MountSmall, runner_factory: Callable[..., Runner]
) -> None:
    """A page of a log is found through its checkpoint index (log-index/, in the data folder),
    which the read itself makes or grows. On a full disk that write failed and the read with it:
    500 for every page and for the follow stream, of every job. The index is a cache: the read
    now goes on without it (from the log's start) and the index is made once there is room."""
    data = small_disk(tmp_path / "data", "16m")
    runner = runner_factory()
    job = runner.wait(runner.submit({"bytes": 2_000_000})["id"], timeout=30)
    assert job["status"] == "success"
    hog = data / "hog"
    subprocess.run(["dd", "if=/dev/zero", f"of={hog}", "bs=1M", "count=64"], capture_output=True, timeout=60)
    pages = {}
    for offset in (0, 1_500_000):
        r = runner.client.get(f"/api/runner/jobs/{job['id']}/logs", params={"offset": offset, "limit": 1000})
        assert r.status_code == 200, r.text
        pages[offset] = r.json()
    with runner.client.stream(
        "GET", f"/api/runner/jobs/{job['id']}/logs/stream", params={"offset": 1_990_000}
    ) as stream:
        assert stream.status_code == 200
        assert "event: end" in "".join(stream.iter_text())
    hog.unlink()
    for offset, page in pages.items():
        r = runner.client.get(f"/api/runner/jobs/{job['id']}/logs", params={"offset": offset, "limit": 1000})
        assert r.json() == page  # the same page as through the index made now


def test_a_workspace_that_cannot_be_made_fails_the_prepare_not_the_runner(
    tmp_path: Path, small_disk: MountSmall, runner_factory: Callable[..., Runner]
) -> None:
    """A disk out of space or inodes where workspaces live: git's own failures were `clone_failed`
    and the like, but the folder of a scratch workspace (and the git HOME of the others) is made
    by the runner, whose OSError ended the job as `internal_error` "internal runner error", its
    prepare stage left `running` in the terminal row. Now it is `prepare_failed`, saying why."""
    workspaces = small_disk(tmp_path / "ws", "1m")
    runner = runner_factory(RUNNER_WORKSPACE_DIR=str(workspaces))
    assert runner.wait(runner.submit({})["id"], timeout=30)["status"] == "success"
    # The job's Landlock domain holds its workspace folder's inode until the kernel frees the
    # domain, a moment after the job's last process is reaped (deferred work): the remount
    # refuses to go under the inodes in use.
    assert wait_until(
        lambda: os.statvfs(workspaces).f_files - os.statvfs(workspaces).f_ffree <= 1, timeout=10
    )
    subprocess.run(["mount", "-o", "remount,nr_inodes=1", str(workspaces)], check=True, timeout=30)
    try:
        done = runner.wait(runner.submit({})["id"], timeout=30)
    finally:
        subprocess.run(["mount", "-o", "remount,nr_inodes=1024", str(workspaces)], check=True, timeout=30)
    assert (done["status"], done["error_code"]) == ("failed", "prepare_failed"), done
    assert "No space left on device" in done["error_message"], done
    prepare = next(s for s in done["stages"] if s["name"] == "prepare")
    assert prepare["status"] == "failed" and "No space left on device" in prepare["error"]
    assert runner.wait(runner.submit({})["id"], timeout=30)["status"] == "success"  # inodes are back


# Forks children that sleep until it cannot fork any more (or made 40), and says how many it made.
_FORKS = """import os, time
made = 0
for _ in range(40):
    try:
        pid = os.fork()
    except BlockingIOError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    made += 1
print("forked", made)
"""


# Execs its arguments once the runner has set its RLIMIT_NPROC to argv[1] (or 5 s went by).
_AWAIT_LIMIT = """import os, resource, sys, time
for _ in range(500):
    if resource.getrlimit(resource.RLIMIT_NPROC)[0] == int(sys.argv[1]):
        break
    time.sleep(0.01)
os.execv(sys.argv[2], sys.argv[2:])
"""


def _uid_without_processes() -> int:
    """A uid with no account and no process, zombies included: RLIMIT_NPROC counts every process
    of the uid in the kernel, so a fixed one was shared with whatever else ran as it (a killed but
    unreaped child of an earlier run), and the job could fork fewer than its four. Drawn at random
    from a wide range, checked here."""
    used = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            line = next(x for x in status.read_text().splitlines() if x.startswith("Uid:"))
        except (OSError, StopIteration):  # gone meanwhile
            continue
        used.update(int(u) for u in line.split()[1:])
    taken = used | {entry.pw_uid for entry in pwd.getpwall()}
    return next(uid for uid in iter(lambda: random.randrange(1 << 20, 1 << 30), None) if uid not in taken)


def test_a_fork_bomb_stops_at_the_jobs_process_limit(runner_factory: Callable[..., Runner]) -> None:
    """RLIMIT_NPROC counts every process and thread of the job's user, and the kernel does not
    enforce it for root; so the job here runs as an unused uid of its own (setpriv), as a
    runner's own user would be, with RUNNER_JOB_MAX_PROCESSES=5: it forks 4 children, not 40."""
    setpriv, python = shutil.which("setpriv"), "/usr/bin/python3"
    if os.geteuid() != 0 or setpriv is None or not os.access(python, os.X_OK):
        pytest.skip("needs root, util-linux's setpriv and /usr/bin/python3 to run a job as another uid")
    uid = str(_uid_without_processes())
    # setpriv starts as root and waits for the runner's limit before it becomes `uid`: the runner
    # sets it from outside right after the spawn, which for another uid needs CAP_SYS_RESOURCE,
    # and a CI machine's root lacks it (`job_nproc_not_set`: the job forked 40 once setpriv was
    # quicker than the runner).
    as_uid = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    command = json.dumps([python, "-c", _AWAIT_LIMIT, "5", *as_uid, python, "-c", _FORKS])
    runner = runner_factory(
        extra_toml=f"\n[scripts.forks]\ncommand = {command}\n", RUNNER_JOB_MAX_PROCESSES="5"
    )
    done = runner.wait(runner.submit({}, script="forks")["id"], timeout=60)
    log = runner.client.get(f"/api/runner/jobs/{done['id']}/logs").json()["content"]
    assert done["status"] == "success", log
    assert "forked 4" in log.splitlines(), log


def test_hundreds_of_short_lived_children_are_all_gone_when_the_job_ends(
    runner_factory: Callable[..., Runner],
) -> None:
    """A bounded burst of processes (not a fork bomb): 400 children waited for, then 100 that
    outlive their parent shell inside the job's group. The job ends on time and leaves nothing."""
    from codex_runner.execution.procscan import find_job_processes

    burst = (
        "i=0; while [ $i -lt 400 ]; do /bin/true & i=$((i+1)); done; wait; "
        "i=0; while [ $i -lt 100 ]; do (sleep 30 &); i=$((i+1)); done; echo spawned"
    )
    runner = runner_factory(extra_toml=f'\n[scripts.burst]\ncommand = ["/bin/sh", "-c", "{burst}"]\n')
    started = time.monotonic()
    done = runner.wait(runner.submit({}, script="burst")["id"], timeout=60)
    assert (done["status"], done["exit_code"]) == ("success", 0), done
    assert time.monotonic() - started < 30
    assert wait_until(lambda: done["id"] not in find_job_processes(), timeout=10)
    zombies = [
        line
        for line in subprocess.run(
            ["ps", "-o", "stat=", "--ppid", str(os.getpid())], capture_output=True, text=True, timeout=30
        ).stdout.split()
        if line.startswith("Z")
    ]
    assert zombies == []


def test_a_job_whose_log_cannot_be_made_ends_with_no_stage_running(
    tmp_path: Path, small_disk: MountSmall, runner_factory: Callable[..., Runner]
) -> None:
    """No inode left for the log file of a scratch job (made right after its spawn): the job fails
    as `internal_error` (docs/failure-modes.md) and its process is stopped, but its terminal row
    kept the `script` stage `running` for ever. A stage an internal error interrupts now fails."""
    logs = small_disk(tmp_path / "logs", "1m")
    runner = runner_factory(RUNNER_LOG_DIR=str(logs))
    # Not one inode more than in use: the folder itself and the launcher's mark (logs/location.py).
    mark = logs / f".writer-{runner.runtime.settings.id}"
    deadline = time.monotonic() + 10
    while not mark.exists():
        assert time.monotonic() < deadline, "the launcher did not mark its log folder"
        time.sleep(0.02)
    st = os.statvfs(logs)
    used = st.f_files - st.f_ffree
    subprocess.run(["mount", "-o", f"remount,nr_inodes={used}", str(logs)], check=True, timeout=30)
    try:
        done = runner.wait(runner.submit({"sleep": "30"})["id"], timeout=30)
    finally:
        subprocess.run(["mount", "-o", "remount,nr_inodes=1024", str(logs)], check=True, timeout=30)
    assert (done["status"], done["error_code"]) == ("failed", "internal_error"), done
    stages = {s["name"]: s for s in done["stages"]}
    assert [n for n, s in stages.items() if s["status"] == "running"] == [], stages
    assert stages["script"]["status"] == "failed" and stages["script"]["finished_at"], stages


def test_retention_makes_room_on_a_full_database_disk(
    tmp_path: Path, small_disk: MountSmall, runner_factory: Callable[..., Runner]
) -> None:
    """Retention deletes expired jobs' rows, then their files (as orphans). When the disk that holds
    the SQLite database and the logs was full, the first delete failed for want of room (SQLite
    writes its WAL first), so no file went either: neither the periodic cleanup nor
    `codex-runner cleanup` could free the disk. On a full disk the expired jobs' files now go
    first, then their rows."""
    from datetime import timedelta

    from codex_runner.ops.retention import cleanup
    from codex_runner.store.records import utcnow

    data = small_disk(tmp_path / "data", "16m")
    runner = runner_factory(RUNNER_RETENTION_KEEP="0")
    old = runner.wait(runner.submit({"bytes": 8_000_000})["id"], timeout=30)
    assert old["status"] == "success"
    log_file = runner.runtime.settings.log_dir / f"{old['id']}.log"
    assert log_file.stat().st_size > 7_000_000
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={data / 'hog'}", "bs=1M", "count=64"], capture_output=True, timeout=60
    )
    report = cleanup(runner.runtime, now=utcnow() + timedelta(days=31), orphan_grace_seconds=0)
    assert (report.jobs, report.logs, report.run_dirs) == (1, 1, 1), report
    assert not log_file.exists()
    assert runner.client.get(f"/api/runner/jobs/{old['id']}").status_code == 404
    assert runner.wait(runner.submit({})["id"], timeout=30)["status"] == "success"  # room again


def test_a_command_started_on_a_full_database_disk_says_so(tmp_path: Path, small_disk: MountSmall) -> None:
    """With no process holding the SQLite database open, its `-wal` and `-shm` files are gone, and
    a new connection must make them: on a full disk SQLite answers SQLITE_IOERR_SHMSIZE, "disk I/O
    error", to every statement. `serve`, `worker` and the admin commands stopped with "error:
    unexpected OperationalError: (sqlite3.OperationalError) disk I/O error"."""
    from codex_runner.runtime import Runtime

    from tests.helpers import CLI
    from tests.integration.conftest import runner_settings

    data = small_disk(tmp_path / "data", "8m")
    url = f"sqlite:///{data / 'runner.db'}"
    Runtime.open(runner_settings(tmp_path, url)).close()  # migrated, then closed: no -wal, no -shm
    env = {**os.environ, "RUNNER_DATA_DIR": str(data), "RUNNER_DATABASE_URL": url}
    command = [CLI, "tokens", "create", "--user", "u", "--role", "user"]
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={data / 'hog'}", "bs=1M", "count=64"], capture_output=True, timeout=60
    )
    full = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (full.returncode, full.stderr) == (
        2,
        "error: the database's disk is full; try again later (unavailable)\n",
    )
    (data / "hog").unlink()
    assert subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, timeout=60).returncode == 0


def test_a_terminal_manifest_a_full_disk_refused_is_written_once_there_is_room(
    tmp_path: Path, small_disk: MountSmall, runner_factory: Callable[..., Runner], out: Path
) -> None:
    """The data folder full (the database elsewhere, so the status itself lands): the terminal
    manifest failed (`manifest_write_failed`) and was never written again, so `runs/<id>/` kept the
    `running` document of an ended job (or none) for good. It is now tried again at each heartbeat
    until it lands."""
    files = small_disk(tmp_path / "files", "8m")
    hog, marker = files / "hog", out / "filled"
    runner = _filling_runner(runner_factory, hog, marker, RUNNER_DATA_DIR=str(files))
    done = runner.wait(runner.submit({}, script="fill")["id"], timeout=30)
    assert done["status"] == "success"
    manifest = runner.runtime.settings.runs_dir / done["id"] / "manifest.json"

    def status() -> str | None:
        return json.loads(manifest.read_text())["status"] if manifest.exists() else None

    assert status() != "success"  # the disk was full when the job ended
    hog.unlink()
    assert wait_until(lambda: status() == "success", timeout=15), status()


def test_a_fenced_runs_manifest_a_full_disk_refused_is_written_once_there_is_room(
    tmp_path: Path,
    small_disk: MountSmall,
    runner_factory: Callable[..., Runner],
    monkeypatch: pytest.MonkeyPatch,
    out: Path,
) -> None:
    """As above, for a run that learns at its terminal write that another instance failed the job
    meanwhile (its instance frozen): it writes the row's ending to its manifest
    (`_fenced_manifest`), and on a full disk that write was given up at once, the `running`
    manifest kept for good."""

    from codex_runner import launcher as launcher_module

    fail_elsewhere_when_the_script_ends(monkeypatch)
    files = small_disk(tmp_path / "files", "8m")
    hog, marker = files / "hog", out / "filled"
    runner = _filling_runner(runner_factory, hog, marker, RUNNER_DATA_DIR=str(files))
    job = runner.submit({}, script="fill")
    manifest = runner.runtime.settings.runs_dir / job["id"] / "manifest.json"

    def status() -> str | None:
        try:
            return str(json.loads(manifest.read_text())["status"])
        except (OSError, ValueError, KeyError):
            return None

    assert wait_until(marker.exists, timeout=30)
    assert runner.wait(job["id"], timeout=30)["error_code"] == "heartbeat_stale"
    # The run's own end, its manifest write refused meanwhile.
    assert wait_until(
        lambda: not any(job["id"] in la.active for la in list(launcher_module._LIVE)), timeout=30
    )
    assert status() != "failed"
    hog.unlink()
    assert wait_until(lambda: status() == "failed", timeout=15), status()


def test_readyz_is_not_ready_while_the_database_disk_is_full(
    tmp_path: Path, small_disk: MountSmall, runner_factory: Callable[..., Runner]
) -> None:
    """While the SQLite database's disk was full, `/readyz` said ready (the database answers its
    `SELECT 1`) though every create was refused: a load balancer kept sending them to the instance.
    It now answers 503 (no details: SPEC §4) until a write lands again."""
    data = small_disk(tmp_path / "data", "24m")
    hog, marker = data / "hog", tmp_path / "filled"
    runner = _filling_runner(runner_factory, hog, marker)
    assert runner.client.get("/readyz").status_code == 200
    runner.submit({}, script="fill")
    assert wait_until(marker.exists, timeout=20)
    refused = runner.client.post(
        "/api/runner/jobs", json={"repo": "scratch", "script_key": "behave", "args": {}}
    )
    assert refused.status_code == 503, refused.text
    not_ready = runner.client.get("/readyz")
    assert (not_ready.status_code, not_ready.json()) == (503, {"code": "unavailable", "detail": "not ready"})
    assert runner.client.head("/readyz").status_code == 503
    hog.unlink()
    # The instance's next heartbeat lands: ready again, without a restart.
    assert wait_until(lambda: runner.client.get("/readyz").status_code == 200, timeout=15)
    assert runner.wait(runner.submit({})["id"], timeout=30)["status"] == "success"


def test_a_full_database_disk_is_logged_once_when_it_begins_and_once_when_it_ends(
    tmp_path: Path, small_disk: MountSmall, runner_factory: Callable[..., Runner]
) -> None:
    """Reads go on while the disk is full, writes fail: the launcher logged `database_unavailable`
    at each refused heartbeat and `database_reachable_again` at the next read that answered (the
    watchdog's, a claim that found nothing to claim), a pair per heartbeat for as long as the disk
    stayed full. It now logs `database_disk_full` once, and `database_writable_again` once a write
    lands."""
    from structlog.testing import capture_logs

    data = small_disk(tmp_path / "data", "24m")
    hog, marker = data / "hog", tmp_path / "filled"
    runner = _filling_runner(runner_factory, hog, marker)
    long = runner.submit({"sleep": "12"})
    runner.wait(long["id"], statuses={"running"}, timeout=15)
    names = {
        "database_unavailable",
        "database_reachable_again",
        "database_disk_full",
        "database_writable_again",
    }
    with capture_logs() as logs:
        runner.submit({}, script="fill")
        assert wait_until(marker.exists, timeout=20)
        # Several refused heartbeats (each retried for 1.5 s, RUNNER_HEARTBEAT_SECONDS=1 apart), and
        # twice as many watchdog passes whose reads answer.
        time.sleep(7)
        hog.unlink()
        assert runner.wait(long["id"], timeout=30)["status"] == "success"
        wait_until(lambda: any(e["event"] == "database_writable_again" for e in logs), timeout=10)
    outage = [e for e in logs if e["event"] in names]
    assert [e["event"] for e in outage] == ["database_disk_full", "database_writable_again"], outage
    assert sum(e["event"] == "heartbeat_failed" for e in logs) >= 2, logs  # refused more than once
    assert outage[0]["log_level"] == "warning" and "disk is full" in outage[0]["detail"]


#: The runtime, a function that leaves a job of a runner id behind, and the file that fills the disk.
FullRunsDisk = tuple[Any, Callable[[str], Path], Path]


@pytest.fixture
def full_runs_disk(tmp_path: Path, small_disk: MountSmall, database_url: str) -> Iterator[FullRunsDisk]:
    """A runtime (no server) whose data folder is a full disk (the database elsewhere), with one job
    of `runner_id` left `running` there by an instance that died: its manifest says `running`."""
    from codex_runner.execution.manifest import ManifestWriter
    from codex_runner.runtime import Runtime
    from codex_runner.store.jobs import Limits, NewJob

    from tests.integration.conftest import runner_settings

    files = small_disk(tmp_path / "files", "8m")
    rt = Runtime.open(runner_settings(tmp_path, database_url, RUNNER_DATA_DIR=str(files)))

    def make(runner_id: str) -> Path:
        new = NewJob(
            repo_id="r", repo_name="scratch", workspace_mode="scratch", script_key="behave", args={},
            defaults={}, timeout_seconds=60, requested_by="alice",
        )  # fmt: skip
        rt.jobs.create(new, Limits(max_queue_size=10, max_queued_per_user=10))
        [claimed] = rt.jobs.claim(runner_id, slots=1, max_jobs_per_user=5)
        manifest = rt.settings.runs_dir / claimed.id / "manifest.json"
        ManifestWriter(manifest.parent).update({"job_id": claimed.id, "status": "running"}, force=True)
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={files / 'hog'}", "bs=1M", "count=64"],
            capture_output=True,
            timeout=60,
        )
        return manifest

    try:
        yield rt, make, files / "hog"
    finally:
        rt.close()


def _manifest_status(manifest: Path) -> str:
    return str(json.loads(manifest.read_text())["status"])


def test_a_recovered_jobs_manifest_a_full_disk_refused_is_written_once_there_is_room(
    full_runs_disk: FullRunsDisk,
) -> None:
    """Start-up recovery rewrites the manifest of each job it fails (`record_recovery`): the run's
    own said `running`. On a full disk that write was given up at once, and `runs/<id>/` kept the
    `running` manifest of a failed job for good. It is now owed like a run's terminal manifest
    and written at a heartbeat once there is room."""
    import asyncio

    from codex_runner.launcher import Launcher

    rt, make, hog = full_runs_disk
    manifest = make(rt.settings.id)  # this instance's own id: an earlier life's job

    async def recover_then_beat() -> tuple[str, str]:
        launcher = Launcher(rt)
        assert await launcher.recover_own_jobs() == 1
        while_full = _manifest_status(manifest)
        hog.unlink()
        await launcher.heartbeat_once()
        return while_full, _manifest_status(manifest)

    assert asyncio.run(recover_then_beat()) == ("running", "failed")
    row = rt.jobs.get_row(manifest.parent.name)
    assert row is not None and row["error_code"] == "recovered_after_crash"


def test_a_stale_jobs_manifest_a_full_disk_refused_is_written_by_an_api_only_watchdog(
    full_runs_disk: FullRunsDisk,
) -> None:
    """The same for the watchdog's recovery of a dead instance's job (`heartbeat_stale`), in an
    API-only `serve`: its watchdog runs alone, with no heartbeats to write what is owed."""
    import asyncio
    from datetime import timedelta

    from codex_runner.launcher import Launcher
    from codex_runner.store.records import utcnow
    from codex_runner.store.schema import jobs

    rt, make, hog = full_runs_disk
    manifest = make("dead-instance")
    with rt.engine.begin() as conn:  # its instance stopped heartbeating long ago
        conn.execute(
            jobs.update()
            .where(jobs.c.id == manifest.parent.name)
            .values(heartbeat_at=utcnow() - timedelta(seconds=60))
        )

    async def watch() -> tuple[str, str]:
        watcher = Launcher(rt)  # as `ApiPresence`'s: never started
        watcher._db_ok_since = float("-inf")  # long past a new instance's wait for the owners' beats
        assert await watcher.watchdog_once() == 1
        while_full = _manifest_status(manifest)
        hog.unlink()
        task = asyncio.create_task(watcher.watchdog_forever())
        try:
            for _ in range(100):  # a pass every half heartbeat period (0.5 s here)
                if _manifest_status(manifest) != "running":
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
        return while_full, _manifest_status(manifest)

    assert asyncio.run(watch()) == ("running", "failed")
