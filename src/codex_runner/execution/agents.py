"""Agent-specific behaviour of scripts: how the runner recognises a Codex CLI run, applies the
repo's risk policy to its sandbox, gives it a runner-owned CODEX_HOME and reads its events."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from codex_runner.catalog import Catalog, ScriptSpec
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
# codex options (short form, long form) that choose what the sandbox lets it write: its mode,
# another root (which the sandbox makes writable), more writable folders; and its config.
_SANDBOX = ("-s", "--sandbox")
_ROOT = ("-C", "--cd")
_ADD_DIR = (None, "--add-dir")
_CONFIG = ("-c", "--config")


def _option_at(argv: list[str], i: int, option: tuple[str | None, str]) -> tuple[str, list[str]] | None:
    """When `argv[i]` starts `option` in any of its forms (`--long VALUE`, `-s VALUE`,
    `--long=VALUE`, `-sVALUE`): its value and the tokens it spans. None otherwise, and for an
    option without its value (the last token), which codex refuses anyway."""
    short, long = option
    arg = argv[i]
    if arg in option and i + 1 < len(argv):
        return argv[i + 1], argv[i : i + 2]
    if arg.startswith(long + "="):
        return arg[len(long) + 1 :], [arg]
    if short is not None and arg.startswith(short) and len(arg) > 2 and not arg.startswith("--"):
        return arg[2:], [arg]
    return None


def apply_risk_policy(argv: list[str], policy: str, workspace: str | None = None) -> list[str]:
    """Sets `--sandbox` from the repo's policy, whatever the script asked for: an operator's
    script cannot widen a conservative repo's sandbox. Every other way of choosing it goes:
    `--sandbox`/`-s` in any form, a `-c`/`--config` setting of `sandbox_mode` or `sandbox_*`, and
    (but for a permissive repo) the flags that bypass the sandbox altogether, the extra writable
    folders of `--add-dir` and a working root (`-C`/`--cd`) outside `workspace` (which is given
    instead); folders in the workspace stay. One `--sandbox` is put right after `exec`."""
    sandbox = SANDBOX_BY_POLICY.get(policy, "workspace-write")
    guarded = policy != "permissive"
    out = argv[:1]
    rooted = False
    i = 1
    while i < len(argv):
        root = _option_at(argv, i, _ROOT) if guarded and workspace is not None else None
        added = _option_at(argv, i, _ADD_DIR) if guarded else None
        config = _option_at(argv, i, _CONFIG)
        dropped = _option_at(argv, i, _SANDBOX) or (
            config if config and _sandbox_setting(config[0]) else None
        )
        if root is not None:
            if _inside(root[0], workspace or "") and not rooted:
                out += root[1]
                rooted = True
            i += len(root[1])
        elif added is not None:
            if workspace is not None and _inside(added[0], workspace):
                out += added[1]
            i += len(added[1])
        elif dropped is not None:
            i += len(dropped[1])
        elif guarded and argv[i] in BYPASS_FLAGS:
            i += 1
        else:
            out.append(argv[i])
            i += 1
    at = 2 if len(out) > 1 and out[1] in CODEX_EXEC else len(out)
    root_arg = ["-C", workspace] if guarded and workspace is not None and not rooted else []
    return [*out[:at], "--sandbox", sandbox, *root_arg, *out[at:]]


# codex passes its whole environment to the commands the model runs unless this is false: then
# variables whose names contain KEY, SECRET or TOKEN (OPENAI_API_KEY among them) are left out.
ENV_EXCLUDES_SETTING = "shell_environment_policy.ignore_default_excludes"


def keep_secret_variables_from_commands(argv: list[str]) -> list[str]:
    """`-c shell_environment_policy.ignore_default_excludes=false` on every codex run, and no other
    `-c` of that setting (or of the whole `shell_environment_policy` table): the runner-written
    config.toml says so too, but an operator's own config.toml (another provider, a CODEX_HOME
    passed through) did not, and the model's `echo $OPENAI_API_KEY | rev` put the key in the
    job's log past the masking of its exact value. Put right after `exec`."""
    out = argv[:1]
    i = 1
    while i < len(argv):
        config = _option_at(argv, i, _CONFIG)
        if config is not None and _env_policy_setting(config[0]):
            i += len(config[1])
        else:
            out.append(argv[i])
            i += 1
    at = 2 if len(out) > 1 and out[1] in CODEX_EXEC else len(out)
    return [*out[:at], "-c", f"{ENV_EXCLUDES_SETTING}=false", *out[at:]]


def codex_sandboxes_commands(argv: list[str]) -> bool:
    """Whether codex runs the model's commands in a sandbox of its own (`--sandbox` read-only or
    workspace-write, after `apply_risk_policy`, and no bypass flag). codex 0.169 builds that
    sandbox with bubblewrap, which needs mount namespaces, and a Landlock domain forbids every
    mount: such a run cannot be confined by the runner (execution/sandbox.py) as well."""
    if any(arg in BYPASS_FLAGS for arg in argv):
        return False
    for i, arg in enumerate(argv):
        if arg in ("--sandbox", "-s") and i + 1 < len(argv):
            return argv[i + 1] != "danger-full-access"
        if arg.startswith("--sandbox="):
            return arg.partition("=")[2] != "danger-full-access"
    return True  # codex's own default for exec: a read-only sandbox


#: The name of the permission profile the runner gives a codex run (`with_permission_profile`).
PROFILE_NAME = "codex-runner"


def with_permission_profile(
    argv: list[str], workspace: str, hidden: Iterable[str], readable: Iterable[str] = ()
) -> list[str]:
    """Replaces the `--sandbox read-only|workspace-write` that `apply_risk_policy` put after `exec`
    with a codex permission profile of the same meaning that also makes the `hidden` paths (the
    runner's files) unreadable to the model's commands, `readable` ones inside them excepted (a
    worktree's repository): `/` read, the workspace and `/tmp` written (workspace-write), each
    hidden path `none`. codex's own sandbox limits writes only; this is what keeps the runner's
    files out of reach of a codex run that the runner cannot confine itself
    (docs/execution.md, "Job isolation"). Other argv is returned as it is."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "--sandbox" and argv[i + 1] in ("read-only", "workspace-write"):
            break
    else:
        return argv
    writes = argv[i + 1] == "workspace-write"
    access: dict[str, str] = {"/": "read", **({"/tmp": "write"} if writes else {})}
    access.update({path: "none" for path in hidden})
    access.update({path: "read" for path in readable})
    # The workspace lies inside a hidden path (the data folder): the deeper entry wins.
    access[workspace] = "write" if writes else "read"
    table = ", ".join(f"{json.dumps(path)} = {json.dumps(mode)}" for path, mode in access.items())
    profile = [
        "-c",
        f"default_permissions={json.dumps(PROFILE_NAME)}",
        "-c",
        f"permissions.{PROFILE_NAME}.filesystem={{{table}}}",
    ]
    return [*argv[:i], *profile, *argv[i + 2 :]]


def _env_policy_setting(setting: str) -> bool:
    key = setting.lstrip().lstrip("=").partition("=")[0].strip()
    return key in ("shell_environment_policy", ENV_EXCLUDES_SETTING)


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


def _runner_codex_home(settings: Settings) -> Path | None:
    """SPEC §2: RUNNER_CODEX_HOME when set; else the runner's own CODEX_HOME passes through
    (None here); else a runner-owned folder under the data dir."""
    if settings.codex_home is not None:
        return settings.codex_home
    if os.environ.get("CODEX_HOME"):
        return None
    return settings.data_dir / "codex-home"


def codex_home_for(settings: Settings) -> Path | None:
    """The CODEX_HOME of a codex run (`_runner_codex_home`), prepared on first use."""
    home = _runner_codex_home(settings)
    if home is None:
        return None
    # Per job, only when it has no config yet (a managed one was rewritten at start-up by
    # `refresh_codex_home`): an operator's (or a test's) config is left alone.
    if not os.path.lexists(home / CONFIG_NAME):  # a symlink (even dangling) is the operator's
        prepare_codex_home(home)
    return home


def refresh_codex_home(settings: Settings, catalog: Catalog) -> Path | None:
    """At `serve` and `worker` start-up: the runner's own CODEX_HOME with its config.toml written
    when absent or still the runner's (its managed first line), so that an upgrade brings its
    settings to a file an earlier version wrote; an operator's file, or a symlink, stays as it is
    (`prepare_codex_home`). Nothing when no script runs codex or the CODEX_HOME is passed through."""
    home = _runner_codex_home(settings)
    if home is None or not any(is_codex_exec(s) for s in catalog.scripts.values()):
        return None
    return prepare_codex_home(home)
