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


def apply_risk_policy(argv: list[str], policy: str) -> list[str]:
    """Sets `--sandbox` from the repo's policy, whatever the script asked for: an operator's
    script cannot widen a conservative repo's sandbox."""
    sandbox = SANDBOX_BY_POLICY.get(policy, "workspace-write")
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in {"--sandbox", "-s"}:
            out[i + 1] = sandbox
            return out
    # No sandbox flag given: add one right after `exec`.
    at = out.index("exec") + 1 if "exec" in out else len(out)
    return [*out[:at], "--sandbox", sandbox, *out[at:]]


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
    if not (home / CONFIG_NAME).exists():
        prepare_codex_home(home)
    return home
