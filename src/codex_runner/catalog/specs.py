"""The catalog's value types: typed arguments, script templates and their argv assembly, repos."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from codex_runner.errors import InvalidArgs

# Never change: repo ids are uuid5(REPO_NAMESPACE, name), so every instance agrees without coordination.
REPO_NAMESPACE = uuid.UUID("8184653e-df85-501f-8d14-d2872b63e5d8")

ARG_TYPES = ("int", "bool", "string", "enum")
BUILTIN_PLACEHOLDERS = ("workspace", "job_id", "repo", "branch")
# A placeholder is only ever a whole argv element: "{name}".
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Bounds every int even without min/max: the value must fit a 64-bit integer wherever it ends up.
_INT_LIMIT = 2**63
#: Linux's MAX_ARG_STRLEN (32 pages): one argv element with its NUL. A longer value passed every
#: check, was queued, and failed at spawn (E2BIG, "Argument list too long"); SPEC §2 wants argument
#: values refused before a job is queued.
MAX_ARGV_ELEMENT_BYTES = 131072


@dataclass(frozen=True)
class ArgSpec:
    """One typed script argument; `default is None` means no default."""

    name: str
    type: str
    required: bool = False
    default: Any = None
    min: int | None = None
    max: int | None = None
    choices: tuple[str, ...] | None = None
    max_length: int | None = None
    pattern: str | None = None
    flag: str | None = None
    description: str = ""

    def to_public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "required": self.required,
            "default": self.default,
            "min": self.min,
            "max": self.max,
            "choices": list(self.choices) if self.choices is not None else None,
            "max_length": self.max_length,
            "pattern": self.pattern,
        }

    def check(self, value: Any, *, in_argv: bool) -> str | None:
        """The problem with `value`, or None. `in_argv`: the value becomes (part of) an argv element."""
        if self.type == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                return "must be an integer"
            if not -_INT_LIMIT <= value < _INT_LIMIT:
                return "must fit in a 64-bit integer"
            if self.min is not None and value < self.min:
                return f"must be at least {self.min}"
            if self.max is not None and value > self.max:
                return f"must be at most {self.max}"
            # "-5" alone in argv reads as an option; the operator opts in by declaring a negative min.
            if in_argv and value < 0 and self.min is None:
                return "must not be negative (set a negative min to allow it)"
            return None
        if self.type == "bool":
            return None if isinstance(value, bool) else "must be true or false"
        if self.type == "enum":
            if isinstance(value, str) and self.choices is not None and value in self.choices:
                return None
            return "must be one of: " + ", ".join(self.choices or ())
        if not isinstance(value, str):
            return "must be a string"
        if "\x00" in value:
            return "must not contain NUL characters"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must be valid Unicode text"
        if self.max_length is not None and len(value) > self.max_length:
            return f"must be at most {self.max_length} characters"
        # A quarter as many characters cannot reach the limit (4 bytes at most each): no encode then.
        if (
            in_argv
            and len(value) >= MAX_ARGV_ELEMENT_BYTES // 4
            and len(value.encode()) >= MAX_ARGV_ELEMENT_BYTES
        ):
            return f"must be under {MAX_ARGV_ELEMENT_BYTES} bytes of UTF-8 (the most one command-line argument holds)"
        if self.pattern is not None:
            return None if re.fullmatch(self.pattern, value) else f"must match the pattern {self.pattern}"
        if in_argv and value.startswith("-"):
            return "must not start with '-' (it would read as an option)"
        return None


#: How many unknown arguments an `invalid_args` answer names; the rest are counted.
MAX_UNKNOWN_LISTED = 20


@dataclass(frozen=True)
class ScriptSpec:
    """An operator-approved command template. `repos is None` means any repo."""

    key: str
    label: str
    description: str
    command: tuple[str, ...]
    stdin: str | None
    timeout_seconds: int
    env: tuple[str, ...]
    repos: tuple[str, ...] | None
    args: Mapping[str, ArgSpec]

    def argv_arg_names(self) -> frozenset[str]:
        """Arguments whose values end up in argv (as a placeholder element or after their flag)."""
        placeholders = {m[1] for el in self.command if (m := PLACEHOLDER.fullmatch(el))}
        return frozenset(n for n, a in self.args.items() if n in placeholders or a.flag is not None)

    def validate_args(self, raw: Any) -> dict[str, Any]:
        """Normalised arguments with defaults filled; `InvalidArgs` lists every problem at once.

        A JSON `null` counts as absent, so the default (or the "is required" error) applies.
        """
        if not isinstance(raw, Mapping):
            raise InvalidArgs(
                "args must be an object", errors=[{"loc": ["body", "args"], "msg": "must be an object"}]
            )
        errors: list[dict[str, Any]] = []
        unknown = [name for name in raw if name not in self.args]
        for name in unknown[:MAX_UNKNOWN_LISTED]:
            errors.append({"loc": ["body", "args", str(name)], "msg": "unknown argument"})
        if len(unknown) > MAX_UNKNOWN_LISTED:
            # A body of thousands of unknown keys must not make an answer larger than itself.
            more = len(unknown) - MAX_UNKNOWN_LISTED
            errors.append({"loc": ["body", "args"], "msg": f"and {more} more unknown arguments"})
        in_argv = self.argv_arg_names()
        out: dict[str, Any] = {}
        for name, spec in self.args.items():
            value = raw.get(name)
            if value is None:
                if spec.required:
                    errors.append({"loc": ["body", "args", name], "msg": "is required"})
                elif spec.default is not None:
                    out[name] = spec.default
                continue
            problem = spec.check(value, in_argv=name in in_argv)
            if problem:
                errors.append({"loc": ["body", "args", name], "msg": problem})
            else:
                out[name] = value
        if errors:
            summary = "; ".join(f"{clip(e['loc'][-1])}: {e['msg']}" for e in errors)
            raise InvalidArgs(f"invalid args for script {self.key!r}: {summary}", errors=errors)
        return out

    def defaults(self) -> dict[str, Any]:
        return {n: a.default for n, a in self.args.items() if a.default is not None}

    def build_argv(
        self, args: Mapping[str, Any], *, workspace: str, job_id: str, repo: str, branch: str
    ) -> list[str]:
        """The argv to exec (no shell) from validated `args`: placeholders, then `[flag, value]` pairs."""
        builtins = {"workspace": workspace, "job_id": job_id, "repo": repo, "branch": branch}
        args = {**self.defaults(), **args}  # stored args may omit values equal to their default
        argv: list[str] = []
        for element in self.command:
            m = PLACEHOLDER.fullmatch(element)
            if m is None:
                argv.append(element)
            elif m[1] in builtins:
                argv.append(builtins[m[1]])
            elif args.get(m[1]) is not None:
                argv.append(render(args[m[1]]))
            # An absent optional argument without a default drops its element.
        for name, spec in self.args.items():
            value = args.get(name)
            if spec.flag is None or value is None:
                continue
            if spec.type == "bool":
                if value:
                    argv.append(spec.flag)
            else:
                argv += [spec.flag, render(value)]
        return argv

    def build_stdin(self, args: Mapping[str, Any], **builtins: str) -> bytes | None:
        """Bytes for standard input, or None for /dev/null (no `stdin`, or its argument is absent)."""
        if self.stdin is None:
            return None
        name = self.stdin[1:-1]
        value = {**self.defaults(), **args}.get(name) if name in self.args else builtins.get(name)
        return None if value is None else render(value).encode("utf-8")

    def allows_repo(self, repo_name: str) -> bool:
        return self.repos is None or repo_name in self.repos

    def to_public(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "description": self.description,
            "timeout_seconds": self.timeout_seconds,
            "repos": list(self.repos) if self.repos is not None else None,
            "args": [a.to_public() for a in self.args.values()],
        }


@dataclass(frozen=True)
class RepoSpec:
    id: str
    name: str
    source: str
    source_type: str
    branch: str
    workspace: str
    enabled: bool
    commit: bool
    push: bool
    credential: str | None
    risk_policy: str = "conservative"

    def public_url(self) -> str:
        """`source` without userinfo, query or fragment: safe to show, log and return."""
        if self.source_type == "local_path":
            return self.source
        parts = urlsplit(self.source)
        return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))

    def to_public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "source_type": self.source_type,
            "path_or_url": self.public_url(),
            "branch": self.branch,
            "workspace": self.workspace,
            "enabled": self.enabled,
        }


def repo_id_for(name: str) -> str:
    return str(uuid.uuid5(REPO_NAMESPACE, name))


def render(value: Any) -> str:
    """An argument value as argv/stdin text: bools as true/false, ints in decimal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def clip(value: object, limit: int = 80) -> str:
    """Client-supplied names echoed in messages are shortened: messages stay one readable line."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"


#: codex's `exec` subcommand and its alias.
CODEX_EXEC = frozenset({"exec", "e"})


def is_codex(command: list[str] | tuple[str, ...]) -> bool:
    return bool(command) and os.path.basename(command[0]) == "codex"


def codex_command_problem(command: list[str] | tuple[str, ...]) -> str | None:
    """Why the runner will not run this codex command, or None: only `codex exec …` (or `codex e
    …`), with codex's options after the subcommand, is a form whose sandbox the repo's risk policy
    sets (`apply_risk_policy`). An option before it (`codex --yolo exec`), or another subcommand,
    would run codex with whatever sandbox the command chose."""
    if not is_codex(command):
        return None
    if len(command) < 2 or command[1] not in CODEX_EXEC:
        return (
            "runs codex other than as `codex exec ...` (options after `exec`): only there can the "
            "repo's risk policy set its sandbox"
        )
    return None
