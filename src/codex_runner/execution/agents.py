"""Agent-specific behaviour of scripts: how the runner recognises a Codex CLI run, applies the
repo's risk policy to its sandbox, gives it a runner-owned CODEX_HOME and reads its events."""

from __future__ import annotations

import os
from pathlib import Path

from codex_runner.catalog import ScriptSpec
from codex_runner.config import Settings
from codex_runner.execution.codex_home import CONFIG_NAME, prepare_codex_home

# Risk policy → codex sandbox. Only `permissive` lets the agent leave its workspace.
SANDBOX_BY_POLICY = {
    "conservative": "workspace-write",
    "standard": "workspace-write",
    "permissive": "danger-full-access",
}


def is_codex_exec(script: ScriptSpec) -> bool:
    """A script that runs `codex exec` (the built-in `codex.exec` or an operator's own)."""
    return (
        bool(script.command)
        and os.path.basename(script.command[0]) == "codex"
        and "exec" in script.command[1:3]
    )


# codex flags that turn the sandbox (and approvals) off whatever `--sandbox` says.
_BYPASS_FLAGS = frozenset({"--dangerously-bypass-approvals-and-sandbox", "--yolo"})


def apply_risk_policy(argv: list[str], policy: str) -> list[str]:
    """Sets `--sandbox` from the repo's policy, whatever the script asked for: an operator's
    script cannot widen a conservative repo's sandbox. Every other way of choosing it goes:
    `--sandbox X`, `-s X`, `--sandbox=X`, `-sX`, a `-c`/`--config` setting of `sandbox_mode` or
    `sandbox_*`, and (but for a permissive repo) the flags that bypass the sandbox altogether. One
    `--sandbox` is put right after `exec`."""
    sandbox = SANDBOX_BY_POLICY.get(policy, "workspace-write")
    out = argv[:1]
    i = 1
    while i < len(argv):
        arg = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else None
        if value is not None and (
            arg in {"--sandbox", "-s"} or (arg in {"-c", "--config"} and _sandbox_setting(value))
        ):
            i += 2
        elif (
            arg.startswith("--sandbox=")
            or (arg.startswith("-s") and not arg.startswith("--") and len(arg) > 2)
            or (arg.startswith("--config=") and _sandbox_setting(arg[len("--config=") :]))
            or (arg.startswith("-c") and not arg.startswith("--") and _sandbox_setting(arg[2:]))
            or (arg in _BYPASS_FLAGS and policy != "permissive")
        ):
            i += 1
        else:
            out.append(arg)
            i += 1
    at = out.index("exec") + 1 if "exec" in out else len(out)
    return [*out[:at], "--sandbox", sandbox, *out[at:]]


def _sandbox_setting(setting: str) -> bool:
    """A `-c key=value` override of codex's sandbox (`sandbox_mode`, `sandbox_workspace_write.*`)."""
    return setting.lstrip().lstrip("=").startswith("sandbox")


def codex_home_for(settings: Settings) -> Path | None:
    """SPEC §2: RUNNER_CODEX_HOME when set; else the runner's own CODEX_HOME passes through
    (None here); else a runner-owned folder under the data dir, prepared on first use."""
    if settings.codex_home is not None:
        home = settings.codex_home
    elif os.environ.get("CODEX_HOME"):
        return None
    else:
        home = settings.data_dir / "codex-home"
    # Prepared only when it has no config yet: an operator's (or a test's) config is left alone.
    if not os.path.lexists(home / CONFIG_NAME):  # a symlink (even dangling) is the operator's
        prepare_codex_home(home)
    return home
