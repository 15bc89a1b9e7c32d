"""Agent-specific behaviour of scripts: how the runner recognises a Codex CLI run, applies the
repo's risk policy to its sandbox, gives it a runner-owned CODEX_HOME and reads its events."""

from __future__ import annotations

import os
from pathlib import Path

from codex_runner.catalog import ScriptSpec
from codex_runner.catalog.specs import CODEX_EXEC, is_codex
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
    return is_codex(script.command) and len(script.command) > 1 and script.command[1] in CODEX_EXEC


# codex flags that turn the sandbox (and approvals) off whatever `--sandbox` says.
BYPASS_FLAGS = frozenset({"--dangerously-bypass-approvals-and-sandbox", "--yolo"})
# codex options that widen what the sandbox lets it write: more writable folders, another root.
_ROOT_OPTIONS = frozenset({"-C", "--cd"})
_ADD_DIR = "--add-dir"


def apply_risk_policy(argv: list[str], policy: str, workspace: str | None = None) -> list[str]:
    """Sets `--sandbox` from the repo's policy, whatever the script asked for: an operator's
    script cannot widen a conservative repo's sandbox. Every other way of choosing it goes:
    `--sandbox X`, `-s X`, `--sandbox=X`, `-sX`, a `-c`/`--config` setting of `sandbox_mode` or
    `sandbox_*`, and (but for a permissive repo) the flags that bypass the sandbox altogether, the
    extra writable folders of `--add-dir` and a working root (`-C`/`--cd`, which the sandbox makes
    writable) outside `workspace` (which is given instead); folders in the workspace stay. One `--sandbox` is put right after
    `exec`."""
    sandbox = SANDBOX_BY_POLICY.get(policy, "workspace-write")
    guarded = policy != "permissive"
    out = argv[:1]
    rooted = False
    i = 1
    while i < len(argv):
        arg = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else None
        if guarded and workspace is not None and value is not None and arg in _ROOT_OPTIONS:
            if _inside(value, workspace) and not rooted:
                out += [arg, value]
                rooted = True
            i += 2
        elif (
            guarded
            and workspace is not None
            and (arg.startswith("--cd=") or (arg.startswith("-C") and len(arg) > 2))
        ):
            attached = arg[len("--cd=") :] if arg.startswith("--cd=") else arg[2:]
            if _inside(attached, workspace) and not rooted:
                out.append(arg)
                rooted = True
            i += 1
        elif guarded and value is not None and arg == _ADD_DIR:
            if workspace is not None and _inside(value, workspace):
                out += [arg, value]
            i += 2
        elif guarded and arg.startswith(_ADD_DIR + "="):
            if workspace is not None and _inside(arg[len(_ADD_DIR) + 1 :], workspace):
                out.append(arg)
            i += 1
        elif value is not None and (
            arg in {"--sandbox", "-s"} or (arg in {"-c", "--config"} and _sandbox_setting(value))
        ):
            i += 2
        elif (
            arg.startswith("--sandbox=")
            or (arg.startswith("-s") and not arg.startswith("--") and len(arg) > 2)
            or (arg.startswith("--config=") and _sandbox_setting(arg[len("--config=") :]))
            or (arg.startswith("-c") and not arg.startswith("--") and _sandbox_setting(arg[2:]))
            or (arg in BYPASS_FLAGS and guarded)
        ):
            i += 1
        else:
            out.append(arg)
            i += 1
    at = 2 if len(out) > 1 and out[1] in CODEX_EXEC else len(out)
    root = ["-C", workspace] if guarded and workspace is not None and not rooted else []
    return [*out[:at], "--sandbox", sandbox, *root, *out[at:]]


def _inside(path: str, workspace: str) -> bool:
    """Whether `path` (relative ones from the workspace, as codex takes them) is the workspace or
    lies in it, symlinks resolved: narrowing the sandbox to a folder of the repo is fine, a link in
    the repo to `/` is not."""
    real = os.path.realpath(os.path.join(workspace, path))
    root = os.path.realpath(workspace)
    return real == root or real.startswith(root + os.sep)


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
