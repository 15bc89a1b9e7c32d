"""Turns the raw `[repos.*]` and `[scripts.*]` tables into specs, or a `ConfigError` naming the TOML path.

Pure: no network, no file system. A missing local repo is not a config error (doctor reports it).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

from codex_runner.catalog.specs import (
    ARG_TYPES,
    BUILTIN_PLACEHOLDERS,
    PLACEHOLDER,
    ArgSpec,
    RepoSpec,
    ScriptSpec,
    codex_command_problem,
    repo_id_for,
)
from codex_runner.config import MAX_SECONDS
from codex_runner.errors import ConfigError
from codex_runner.execution.git import is_loopback_host

WORKSPACE_MODES = ("worktree", "clone", "in_place", "scratch")
RISK_POLICIES = ("conservative", "standard", "permissive")
URL_SCHEMES = ("https", "ssh", "file")

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REPO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_SCRIPT_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_FLAG = re.compile(r"--?[A-Za-z0-9][A-Za-z0-9._-]*")
_HOSTNAME = re.compile(r"[a-z0-9._:-]+")
_SCP_LIKE = re.compile(r"[^/:]+@[^/:]+:.*")
_BARE_TOML_KEY = re.compile(r"[A-Za-z0-9_-]+")
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")

# Built-in scripts (SPEC §2). A `[scripts."codex.exec"]` table in runner.toml replaces this one.
BUILTIN_SCRIPTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "codex.exec": {
            "label": "Codex: run a prompt",
            "description": "Runs `codex exec` non-interactively in the job's workspace; the prompt is read "
            "from standard input.",
            "command": [
                "codex",
                "exec",
                "--json",
                # No transcript in the CODEX_HOME every job shares and can read (docs/codex.md).
                "--ephemeral",
                "--sandbox",
                "workspace-write",
                "--color",
                "never",
                "-C",
                "{workspace}",
                "-",
            ],
            "stdin": "{prompt}",
            "env": ["OPENAI_API_KEY", "CODEX_HOME"],
            "args": {
                "prompt": {"type": "string", "required": True, "max_length": 100000},
                "model": {
                    "type": "string",
                    "pattern": "^[A-Za-z0-9._:][A-Za-z0-9._:-]{0,63}$",
                    "flag": "--model",
                },
            },
        }
    }
)


def _toml_key(key: str) -> str:
    return key if _BARE_TOML_KEY.fullmatch(key) else json.dumps(key)


class _Table:
    """A raw TOML table plus its path, with typed getters that fail naming the exact key."""

    def __init__(self, raw: Any, where: str) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: must be a table")
        self.raw: Mapping[str, Any] = raw
        self.where = where

    def at(self, *keys: str | int) -> str:
        """The TOML path of a key below this table: `.name` for keys, `[i]` for list indexes."""
        return self.where + "".join(f"[{k}]" if isinstance(k, int) else f".{_toml_key(k)}" for k in keys)

    def fail(self, key: str | tuple[str | int, ...] | None, message: str) -> NoReturn:
        keys = () if key is None else (key,) if isinstance(key, str) else key
        raise ConfigError(f"{self.at(*keys)}: {message}")

    def only(self, allowed: Iterable[str]) -> None:
        allowed = sorted(allowed)
        for key in self.raw:
            if key not in allowed:
                self.fail(key, f"unknown key (expected one of: {', '.join(allowed)})")

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.raw.get(key, default)
        if value is not None and not (isinstance(value, str) and "\x00" not in value):
            self.fail(key, "must be a string without NUL characters")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, "must be true or false")
        return value

    def integer(self, key: str) -> int | None:
        value = self.raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            self.fail(key, "must be an integer")
        return value

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and "\x00" not in v for v in value):
            self.fail(key, "must be a list of strings")
        return tuple(value)


_REPO_KEYS = ("source", "branch", "workspace", "enabled", "commit", "push", "credential", "risk_policy")
_SCRIPT_KEYS = ("label", "description", "command", "stdin", "timeout_seconds", "env", "repos", "args")
_ARG_KEYS = (
    "type",
    "required",
    "default",
    "min",
    "max",
    "choices",
    "max_length",
    "pattern",
    "flag",
    "description",
)


def parse_repo(name: str, raw: Any, *, config_file: str = "runner.toml") -> RepoSpec:
    """`config_file`: how errors name the config file (`config.config_source`)."""
    t = _Table(raw, f"{config_file} [repos.{_toml_key(name)}]")
    t.only(_REPO_KEYS)
    if not _REPO_NAME.fullmatch(name):
        t.fail(None, "repo names are 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
    source = t.string("source")
    if not source:
        t.fail("source", "is required")
    source_type = "local_path" if source.startswith("/") else "git_url"
    problem = _local_source_problem(source) if source_type == "local_path" else _url_source_problem(source)
    if problem:
        t.fail("source", problem)
    if source_type == "local_path":
        source = os.path.normpath(source)
    branch = t.string("branch", "main") or ""
    if problem := _ref_problem(branch):
        t.fail("branch", problem)
    workspace = t.string("workspace", "worktree" if source_type == "local_path" else "clone")
    if workspace not in WORKSPACE_MODES:
        t.fail("workspace", f"must be one of: {', '.join(WORKSPACE_MODES)}")
    if workspace == "in_place" and source_type != "local_path":
        t.fail("workspace", "in_place needs a local path source (use clone, worktree or scratch for a URL)")
    commit, push = t.boolean("commit", True), t.boolean("push", False)
    if push and not commit:
        t.fail("push", "push = true needs commit = true")
    credential = t.string("credential")
    if credential is not None and not _CREDENTIAL_NAME.fullmatch(credential):
        t.fail("credential", "must be a credential name (letters, digits, '.', '_', '-')")
    risk_policy = t.string("risk_policy", "conservative")
    if risk_policy not in RISK_POLICIES:
        t.fail("risk_policy", f"must be one of: {', '.join(RISK_POLICIES)}")
    return RepoSpec(
        id=repo_id_for(name),
        name=name,
        source=source,
        source_type=source_type,
        branch=branch,
        workspace=workspace,
        enabled=t.boolean("enabled", True),
        commit=commit,
        push=push,
        credential=credential,
        risk_policy=risk_policy,
    )


def _local_source_problem(source: str) -> str | None:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in source):
        return "must not contain control characters"
    if ".." in source.split("/"):
        return "must not contain '..' (write the real path)"
    return None


def _url_source_problem(source: str) -> str | None:
    if source.startswith("-"):
        return "must not start with '-'"
    if "::" in source.split("/", 1)[0]:
        return "git remote-helper transports (ext::, fd::, ...) are refused"
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in source):
        return "must not contain spaces or control characters"
    scheme = source.split(":", 1)[0].lower() if "://" in source else ""
    if not scheme:
        if _SCP_LIKE.fullmatch(source):
            return "scp-like addresses are refused; write ssh://user@host/path"
        return "must be an absolute local path or an https://, ssh:// or file:// URL"
    if scheme == "http" and _is_loopback(source):
        scheme = "https"  # plain http only to this machine (local mirrors, tests); never over a network
    elif scheme not in URL_SCHEMES:
        return f"scheme {scheme}:// is refused; use https://, ssh:// or file://"
    try:
        parts = urlsplit(source)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    if parts.password is not None:
        return "must not embed a password; store it with `codex-runner credentials set` and name it in credential"
    path = unquote(parts.path)
    if any(seg in {".", ".."} for seg in path.split("/")):
        return "must not contain '.' or '..' path segments"
    if scheme == "file":
        if parts.netloc or not path.startswith("/"):
            return "file:// URLs need an absolute path and no host (file:///srv/git/x)"
        if "%" in parts.path:
            return "file:// URLs must not be percent-encoded (use a local path source)"
        return None
    host = parts.hostname or ""
    if not host or host.startswith("-") or not _HOSTNAME.fullmatch(host):
        return "needs a valid host name"
    if (parts.username or "").startswith("-"):
        return "user name must not start with '-'"
    if len(path) <= 1:
        return "needs a repository path"
    return None


def _is_loopback(url: str) -> bool:
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    # Parsed, not a prefix test: "127.attacker.example" is a DNS name anywhere.
    return is_loopback_host(host)


def _ref_problem(ref: str) -> str | None:
    """git check-ref-format rules for a branch name, plus no leading '-'."""
    if not ref or len(ref) > 200:
        return "must be 1-200 characters"
    if ref.startswith(("-", "/")) or ref.endswith(("/", ".", ".lock")) or ref == "@":
        return "is not a valid git branch name"
    if ".." in ref or "@{" in ref or "//" in ref or _REF_FORBIDDEN.search(ref):
        return "is not a valid git branch name (no '..', '@{', spaces, control characters or ~^:?*[\\)"
    if any(part.startswith(".") or part.endswith(".lock") for part in ref.split("/")):
        return "is not a valid git branch name (no component may start with '.' or end with '.lock')"
    return None


def parse_script(
    key: str,
    raw: Any,
    *,
    default_timeout: int,
    repos: Mapping[str, RepoSpec],
    config_file: str = "runner.toml",
) -> ScriptSpec:
    t = _Table(raw, f"{config_file} [scripts.{json.dumps(key)}]")
    if not _SCRIPT_KEY.fullmatch(key):
        t.fail(
            None, "script keys are 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if "command" not in t.raw and any(isinstance(v, Mapping) and k != "args" for k, v in t.raw.items()):
        # [scripts.codex.exec] without quotes nests tables instead of naming "codex.exec".
        t.fail(None, 'has no command; a key containing dots must be quoted: [scripts."codex.exec"]')
    t.only(_SCRIPT_KEYS)
    label = t.string("label", key) or key
    description = t.string("description", "") or ""
    command = t.strings("command")
    if not command or not command[0]:
        t.fail("command", "must be a non-empty list whose first element is the program")
    if problem := codex_command_problem(command):
        t.fail("command", problem)
    args_table = _Table(t.raw.get("args", {}), t.at("args"))
    args = {name: _parse_arg(name, raw_arg, args_table) for name, raw_arg in args_table.raw.items()}

    placeholders: set[str] = set()
    for i, element in enumerate(command):
        where: tuple[str | int, ...] = ("command", i)
        m = PLACEHOLDER.fullmatch(element)
        if m is None:
            if found := PLACEHOLDER.search(element):
                t.fail(where, f"placeholder {found[0]} must be a whole argv element, not part of {element!r}")
            continue
        if i == 0:
            t.fail(where, "the program must be a literal, not a placeholder")
        if m[1] not in args and m[1] not in BUILTIN_PLACEHOLDERS:
            t.fail(
                where,
                f"unknown placeholder {m[0]} (not an argument nor one of {_braced(BUILTIN_PLACEHOLDERS)})",
            )
        placeholders.add(m[1])

    stdin = t.string("stdin")
    if stdin is not None:
        m = PLACEHOLDER.fullmatch(stdin)
        if m is None or (m[1] not in args and m[1] not in BUILTIN_PLACEHOLDERS):
            t.fail("stdin", 'must be one placeholder naming an argument or a built-in, e.g. "{prompt}"')
    stdin_name = stdin[1:-1] if stdin else None

    for name, arg in args.items():
        flag_at: tuple[str | int, ...] = (name, "flag")
        if arg.flag is not None and name in placeholders:
            args_table.fail(flag_at, f"{{{name}}} is also in command; use either the placeholder or the flag")
        if arg.flag is not None and "--" in command:
            args_table.fail(flag_at, "command contains '--', after which an appended flag is not an option")
        if arg.flag is None and name not in placeholders and name != stdin_name:
            args_table.fail(
                name, f"is not used: put {{{name}}} in command, give it a flag, or feed it to stdin"
            )
        in_argv = name in placeholders or arg.flag is not None
        if arg.default is not None and (problem := arg.check(arg.default, in_argv=in_argv)):
            args_table.fail((name, "default"), f"{problem} (the default must satisfy its own spec)")

    timeout = t.integer("timeout_seconds")
    if timeout is None:
        timeout = default_timeout
    elif timeout < 1:
        t.fail("timeout_seconds", "must be at least 1")
    elif timeout > MAX_SECONDS:
        # Past it, every create of the script failed with a 500 (the column's integer overflowed).
        t.fail("timeout_seconds", f"must be at most {MAX_SECONDS} (ten years)")
    env = t.strings("env") or ()
    for name in env:
        if not _NAME.fullmatch(name):
            t.fail("env", f"{name!r} is not a valid environment variable name")
        if name.startswith("RUNNER_"):
            # The runner's own settings (keys, tokens, database URL) must never reach a script.
            t.fail("env", f"{name!r}: RUNNER_* variables are the runner's own and cannot be passed through")
    allowed_repos = t.strings("repos")
    if allowed_repos is not None:
        if not allowed_repos:
            t.fail("repos", "must not be empty (leave it out to allow any repo)")
        for repo_name in allowed_repos:
            if repo_name not in repos:
                t.fail("repos", f"{repo_name!r} is not a configured repo")

    return ScriptSpec(
        key=key,
        label=label,
        description=description,
        command=command,
        stdin=stdin,
        timeout_seconds=timeout,
        env=tuple(dict.fromkeys(env)),
        repos=allowed_repos,
        args=MappingProxyType(args),
    )


def _braced(names: Iterable[str]) -> str:
    return ", ".join(f"{{{n}}}" for n in names)


def _parse_arg(name: str, raw: Any, args_table: _Table) -> ArgSpec:
    t = _Table(raw, args_table.at(name))
    t.only(_ARG_KEYS)
    if not _NAME.fullmatch(name):
        t.fail(None, "argument names are letters, digits and '_', not starting with a digit")
    if name in BUILTIN_PLACEHOLDERS:
        t.fail(None, f"{name!r} is a built-in placeholder and cannot be an argument name")
    type_ = t.string("type") or ""
    if type_ not in ARG_TYPES:
        t.fail("type", f"must be one of: {', '.join(ARG_TYPES)}")
    required = t.boolean("required", False)
    if required and "default" in t.raw:
        t.fail("default", "a required argument cannot have a default")
    minimum, maximum = t.integer("min"), t.integer("max")
    choices = t.strings("choices")
    max_length = t.integer("max_length")
    pattern = t.string("pattern")
    for key, value, owner in (
        ("min", minimum, "int"),
        ("max", maximum, "int"),
        ("choices", choices, "enum"),
        ("max_length", max_length, "string"),
        ("pattern", pattern, "string"),
    ):
        if value is not None and type_ != owner:
            t.fail(key, f"only applies to {owner} arguments")
    if minimum is not None and maximum is not None and minimum > maximum:
        t.fail("max", f"must be at least min ({minimum})")
    if type_ == "enum" and (not choices or len(set(choices)) != len(choices)):
        t.fail("choices", "an enum needs a non-empty list of distinct choices")
    if max_length is not None and max_length < 1:
        t.fail("max_length", "must be at least 1")
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            t.fail("pattern", f"is not a valid regular expression ({exc})")
    flag = t.string("flag")
    if flag is not None and not _FLAG.fullmatch(flag):
        t.fail("flag", "must look like -x or --name (letters, digits, '.', '_', '-')")
    return ArgSpec(
        name=name,
        type=type_,
        required=required,
        default=t.raw.get("default"),
        min=minimum,
        max=maximum,
        choices=choices,
        max_length=max_length,
        pattern=pattern,
        flag=flag,
        description=t.string("description", "") or "",
    )
