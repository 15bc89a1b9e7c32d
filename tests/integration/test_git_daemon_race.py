"""A job's daemon that outlives its script (it left the job's process group with setsid) while
the runner commits: through a real runner, since the fix is in when the job's processes go."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(120)

# Started by the script in its workspace; out of the job's group and pipes. It waits until the
# runner's commit stage has begun (the `add` rewrites the index), then keeps COMMIT_EDITMSG a
# link to the victim, which `git commit` opens for writing: after the runner's check of `.git`.
DAEMON = """
import os, sys, time
victim, ready = sys.argv[1], sys.argv[2]
index = ".git/index"
before = os.stat(index).st_mtime_ns
open(ready, "w").close()
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        if os.path.exists(".git/index.lock") or os.stat(index).st_mtime_ns != before:
            break
    except OSError:
        pass
    time.sleep(0.0002)
deadline = time.monotonic() + 5
while time.monotonic() < deadline and os.path.isdir(".git"):  # until the workspace is gone
    try:
        if not os.path.islink(".git/COMMIT_EDITMSG"):
            if os.path.lexists(".git/COMMIT_EDITMSG"):
                os.unlink(".git/COMMIT_EDITMSG")
            os.symlink(victim, ".git/COMMIT_EDITMSG")
    except OSError:
        pass
    time.sleep(0.0002)
"""

SCRIPT = """
import os, subprocess, sys, time
from pathlib import Path
ready = Path({ready!r})
subprocess.Popen(
    [sys.executable, "-c", {daemon!r}, {victim!r}, str(ready)],
    start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    env={env},
)
deadline = time.monotonic() + 20
while not ready.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
if not ready.exists():
    sys.exit("the daemon never got ready")
Path("work.txt").write_text("work\\n")
"""

TOML = """
[repos.cloned]
source = "{repo}"
workspace = "clone"
push = false

[scripts.race]
command = ["{python}", "{script}"]
"""


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("environment", ["the job's", "an empty one"])
def test_a_daemon_the_script_left_cannot_race_the_runners_commit(
    runner_factory: Callable[..., Any], tmp_path: Path, environment: str
) -> None:
    """The runner checks the clone's `.git` for symbolic links before it commits, but a daemon
    of the job (setsid: out of its process group, so not stopped with it) ran on until after the
    job ended: it swapped COMMIT_EDITMSG for a link once the check was over, and the runner's
    `git commit` wrote its message over a file outside the workspace (here the victim; the
    database, a key: any file the runner can write). The job's processes now all go before the
    commit stage; and since one that made its own environment cannot be told from any other
    process of the runner's user, the commit no longer writes COMMIT_EDITMSG at all (plumbing:
    `write-tree`, `commit-tree`, `update-ref`)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the operator's data\n")
    script = tmp_path / "race.py"
    script.write_text(
        SCRIPT.format(
            # In the workspace's `.git` (not committed): a confined job cannot write outside its
            # workspace, and with the ready file in tmp_path the daemon died at once and the race
            # was never run (20 s a try for nothing).
            ready=".git/daemon-ready",
            daemon=DAEMON,
            victim=str(victim),
            env="None" if environment == "the job's" else "{}",  # {}: no RUNNER_JOB_ID to find it by
        )
    )
    extra = textwrap.dedent(TOML.format(repo=tmp_path / "repo", python=sys.executable, script=script))
    runner = runner_factory(extra_toml=extra)
    for _ in range(3):  # a race: a few tries make the unfixed build lose it every time here
        job = runner.wait(runner.submit(repo="cloned", script="race")["id"])
        assert victim.read_text() == "the operator's data\n", job
        assert job["status"] == "success", job
        assert job["result"]["commit"], job
