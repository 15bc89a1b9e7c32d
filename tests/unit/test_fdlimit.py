"""The open-file limit against RUNNER_HTTP_MAX_CONNECTIONS (ops/fdlimit.py): each case runs in a
child process whose real limits are set first, so the test process keeps its own."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from codex_runner.config import load_settings
from codex_runner.execution import sandbox
from codex_runner.ops.fdlimit import FDS_PER_JOB, FDS_RESERVED, fds_needed

PROBE = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from codex_runner.config import load_settings
    from codex_runner.ops.doctor import _fd_limit
    from codex_runner.ops.fdlimit import raise_fd_limit

    soft, hard = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    settings = load_settings({"RUNNER_HTTP_MAX_CONNECTIONS": sys.argv[3]}, cwd=Path(sys.argv[4]))
    check = _fd_limit(settings).to_dict()
    limit = raise_fd_limit(settings)
    after = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(json.dumps({"check": check, "returned": [limit.soft, limit.hard], "after": list(after)}))
    """
)
HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def _probe(tmp_path: Path, soft: int, hard: int, cap: int) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(soft), str(hard), str(cap), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.splitlines()[-1]))


def test_needed_counts_the_cap_and_a_reserve(tmp_path: Path) -> None:
    settings = load_settings({"RUNNER_MAX_CONCURRENCY": "4", "RUNNER_JOB_ISOLATION": "off"}, cwd=tmp_path)
    # 1024 connections, 64 refused ones being answered, 256 for the service, 16 per running job.
    assert fds_needed(settings) == 1024 + 64 + 256 + 4 * 16


@pytest.mark.parametrize("isolation", ["auto", "required"])
def test_needed_counts_the_rule_descriptors_the_sandbox_keeps(tmp_path: Path, isolation: str) -> None:
    """The Landlock plans keep an O_PATH descriptor per rule (execution/sandbox.py): up to 8 plans
    of 256 each, which the reserve did not count; with isolation off no plan is ever opened."""
    env = {"RUNNER_MAX_CONCURRENCY": "4", "RUNNER_JOB_ISOLATION": isolation}
    assert sandbox.MAX_KEPT_DESCRIPTORS == sandbox.MAX_PLANS * sandbox.MAX_KEPT_RULES == 8 * 256
    assert (
        fds_needed(load_settings(env, cwd=tmp_path)) == 1024 + 64 + FDS_RESERVED + 4 * FDS_PER_JOB + 8 * 256
    )


def test_the_sandbox_keeps_no_more_plans_than_it_says(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`MAX_PLANS` is the bound `_plan` enforces: more hidden sets than that never leave more
    plans (and their descriptors) behind; and no plan keeps more than `MAX_KEPT_RULES`: a folder on
    the way with more entries (a full suite's temporary folder) kept them all open."""
    monkeypatch.setattr(sandbox, "_plans", {})
    for i in range(sandbox.MAX_KEPT_RULES + 50):
        (tmp_path / f"crowd{i}").mkdir()
    for i in range(sandbox.MAX_PLANS * 2 + 1):
        hidden = tmp_path / f"h{i}"
        hidden.mkdir()
        with sandbox._plans_lock:
            sandbox._plan((str(hidden),), 1).open()
        assert len(sandbox._plans) <= sandbox.MAX_PLANS
        kept = sum(len(p.attrs or ()) for p in sandbox._plans.values())
        assert kept <= sandbox.MAX_KEPT_DESCRIPTORS
    for plan in sandbox._plans.values():
        plan.close()


@pytest.mark.skipif(HARD != resource.RLIM_INFINITY and HARD < 8192, reason="hard open-file limit under 8192")
def test_the_soft_limit_is_raised_as_far_as_the_cap_needs(tmp_path: Path) -> None:
    needed = fds_needed(load_settings({}, cwd=tmp_path))
    hard = 8192 if HARD == resource.RLIM_INFINITY else HARD
    out = _probe(tmp_path, 512, hard, 1024)
    assert out["after"] == [needed, hard] == out["returned"]  # not to the hard limit: jobs inherit it
    assert out["check"]["level"] == "ok"  # type: ignore[index]


def test_a_hard_limit_under_the_cap_is_a_warning_and_the_soft_one_reaches_it(tmp_path: Path) -> None:
    out = _probe(tmp_path, 256, 600, 1024)
    assert out["after"] == [600, 600]
    check = out["check"]
    assert isinstance(check, dict)
    assert check["level"] == "warn" and not check["blocking"]
    assert "RUNNER_HTTP_MAX_CONNECTIONS=1024 needs about" in check["message"]
    assert "the hard limit is 600" in check["message"]


@pytest.mark.skipif(HARD != resource.RLIM_INFINITY and HARD < 2500, reason="hard open-file limit under 2500")
def test_a_limit_high_enough_is_left_alone(tmp_path: Path) -> None:
    out = _probe(tmp_path, 2500, 2500, 8)  # 8 + 64 + 256 + 32 + 2048 (sandbox) = 2408 needed
    assert out["after"] == [2500, 2500]
    assert out["check"]["level"] == "ok"  # type: ignore[index]
