"""Guards around what runs for a job: a repo's risk policy sets codex's sandbox, whatever way the
script's command chose one; git's stderr keeps no part of a secret."""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.parametrize(
    ("extra", "policy"),
    [
        (["--add-dir", "/"], "conservative"),
        (["--add-dir=/etc"], "standard"),
        (["-C", "/"], "conservative"),
        (["--cd", "/"], "conservative"),
        (["--cd=/"], "standard"),
        (["-C/"], "conservative"),
    ],
)
def test_no_option_widens_what_the_sandbox_lets_codex_write(extra: list[str], policy: str) -> None:
    """`--add-dir` makes more folders writable and `-C`/`--cd` moves the root the sandbox makes
    writable: from a script's command or a client's flagged argument, they widened a conservative
    repo's sandbox (a write outside the workspace succeeded with the real codex). They go, and the
    workspace is the root."""
    argv = apply_risk_policy(["codex", "exec", "--json", *extra, "-"], policy, "/ws")
    assert argv == ["codex", "exec", "--sandbox", "workspace-write", "-C", "/ws", "--json", "-"]
    kept = apply_risk_policy(["codex", "exec", "--json", "-C", "/ws", *extra, "-"], policy, "/ws")
    assert kept == ["codex", "exec", "--sandbox", "workspace-write", "--json", "-C", "/ws", "-"]
    wide = apply_risk_policy(["codex", "exec", *extra, "-"], "permissive", "/ws")
    assert wide == ["codex", "exec", "--sandbox", "danger-full-access", *extra, "-"]


def test_the_exec_alias_gets_the_policy_too() -> None:
    """`codex e` is `codex exec`: it was not recognised, and its `--yolo` ran unsandboxed."""
    from codex_runner.catalog import ScriptSpec
    from codex_runner.execution.agents import is_codex_exec

    script = ScriptSpec(
        key="x",
        label="x",
        description="",
        command=("codex", "e", "--yolo", "-"),
        stdin=None,
        timeout_seconds=60,
        env=(),
        repos=None,
        args={},
    )
    assert is_codex_exec(script)
    argv = apply_risk_policy(list(script.command), "conservative", "/ws")
    assert argv == ["codex", "e", "--sandbox", "workspace-write", "-C", "/ws", "-"]


@pytest.mark.parametrize(
    "command",
    [
        ["codex", "--dangerously-bypass-approvals-and-sandbox", "exec", "-"],
        ["codex", "-c", "k=v", "exec", "-"],
        ["codex", "--yolo"],
        ["codex"],
        ["/opt/bin/codex", "resume", "--last"],
    ],
)
def test_codex_runs_only_as_codex_exec(command: list[str]) -> None:
    """Options before `exec` (or no `exec` at all) were not recognised as a codex run: the repo's
    risk policy was skipped and the command's own sandbox choice stood. Refused at start-up."""
    from codex_runner.catalog.specs import codex_command_problem

    assert codex_command_problem(command) is not None
    assert codex_command_problem(["codex", "exec", "--json", "-"]) is None
    assert codex_command_problem(["codex", "e", "-"]) is None
    assert codex_command_problem(["/bin/echo", "--yolo"]) is None


def test_a_root_or_folder_inside_the_workspace_stays(tmp_path: Path) -> None:
    """Narrowing codex to a folder of the repo (`-C {workspace}/packages/app`) is no widening: it
    stays. A folder of the workspace that is a link out of it (committed in the repo) is not."""
    ws = tmp_path / "ws"
    (ws / "packages" / "app").mkdir(parents=True)
    (ws / "escape").symlink_to("/")
    inner = str(ws / "packages" / "app")
    argv = apply_risk_policy(
        ["codex", "exec", "-C", inner, "--add-dir", f"{ws}/packages", "-"], "conservative", str(ws)
    )
    assert argv == [
        "codex",
        "exec",
        "--sandbox",
        "workspace-write",
        "-C",
        inner,
        "--add-dir",
        f"{ws}/packages",
        "-",
    ]
    relative = apply_risk_policy(["codex", "exec", "--cd=packages/app", "-"], "conservative", str(ws))
    assert relative == ["codex", "exec", "--sandbox", "workspace-write", "--cd=packages/app", "-"]
    out = apply_risk_policy(["codex", "exec", "-C", str(ws / "escape"), "-"], "conservative", str(ws))
    assert out == ["codex", "exec", "--sandbox", "workspace-write", "-C", str(ws), "-"]


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["-c", "shell_environment_policy.ignore_default_excludes=true"],
        ["--config", "shell_environment_policy.ignore_default_excludes = true"],
        ["-cshell_environment_policy.ignore_default_excludes=true"],
        ["--config=shell_environment_policy={ignore_default_excludes=true}"],
    ],
)
def test_secret_variables_never_reach_the_commands_codex_runs(extra: list[str]) -> None:
    from codex_runner.execution.agents import keep_secret_variables_from_commands

    argv = keep_secret_variables_from_commands(["codex", "exec", *extra, "-c", "model=o3", "-"])
    assert argv == [
        "codex",
        "exec",
        "-c",
        "shell_environment_policy.ignore_default_excludes=false",
        "-c",
        "model=o3",
        "-",
    ]
    # Other settings of the policy are the operator's.
    kept = ["-c", 'shell_environment_policy.inherit="core"']
    assert kept[1] in keep_secret_variables_from_commands(["codex", "exec", *kept, "-"])
