"""Guards around what runs for a job: a repo's risk policy sets codex's sandbox, whatever way the
script's command chose one; git's stderr keeps no part of a secret."""

from __future__ import annotations

import pytest

from codex_runner.execution.agents import apply_risk_policy

BASE = ["codex", "exec", "--json", "-C", "/ws", "-"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--sandbox", "danger-full-access"],
        ["-s", "danger-full-access"],
        ["--sandbox=danger-full-access"],
        ["-sdanger-full-access"],
        ["-c", 'sandbox_mode="danger-full-access"'],
        ["--config", "sandbox_mode=danger-full-access"],
        ["--config=sandbox_mode=danger-full-access"],
        ['-csandbox_mode="danger-full-access"'],
        ["-c", "sandbox_workspace_write.network_access=true"],
        ["--dangerously-bypass-approvals-and-sandbox"],
        ["--yolo"],
    ],
)
def test_a_conservative_repo_keeps_its_sandbox(extra: list[str]) -> None:
    argv = apply_risk_policy([*BASE[:2], *extra, *BASE[2:]], "conservative")
    assert argv == ["codex", "exec", "--sandbox", "workspace-write", "--json", "-C", "/ws", "-"]


def test_other_settings_and_the_prompt_stay() -> None:
    argv = apply_risk_policy(["codex", "exec", "-c", "model=o3", "--model", "x", "-"], "standard")
    assert argv == ["codex", "exec", "--sandbox", "workspace-write", "-c", "model=o3", "--model", "x", "-"]


def test_a_permissive_repo_runs_without_a_sandbox() -> None:
    argv = apply_risk_policy(["codex", "exec", "--sandbox", "workspace-write", "-"], "permissive")
    assert argv == ["codex", "exec", "--sandbox", "danger-full-access", "-"]
    kept = apply_risk_policy(["codex", "exec", "--yolo", "-"], "permissive")
    assert "--yolo" in kept


def test_git_stderr_is_masked_before_its_tail_is_cut() -> None:
    """A secret that straddles the 8 KiB cut of git's stderr leaves no part of itself behind."""
    from codex_runner.execution.git import STDERR_TAIL_BYTES, _tail

    secret = "s3cr3t-" + "x" * 40
    err = b"b" * 10 + secret.encode() + b"a" * (STDERR_TAIL_BYTES - 20)  # the cut falls inside it
    tail = _tail(err, [secret])
    assert len(tail.encode()) <= STDERR_TAIL_BYTES
    assert secret[-20:] not in tail and "x" * 20 not in tail
