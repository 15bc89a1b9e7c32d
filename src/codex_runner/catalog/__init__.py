"""Repos and scripts from runner.toml: typed argument schemas, argv assembly (never a shell), allowlists.

`Catalog.from_settings` validates the raw `[repos.*]` and `[scripts.*]` tables once, raising `ConfigError`
with the exact TOML path, and never touches the network. `Catalog.resolve` is the one call the API makes
per job request; it has no side effects. The rules are documented in docs/catalog.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from codex_runner.catalog.parse import BUILTIN_SCRIPTS, parse_repo, parse_script
from codex_runner.catalog.specs import REPO_NAMESPACE, ArgSpec, RepoSpec, ScriptSpec, clip, repo_id_for
from codex_runner.config import Settings, config_source
from codex_runner.errors import Forbidden, InvalidRequest, RepoDisabled, RepoNotAllowed, UnknownScript
from codex_runner.jobs import is_id_text

__all__ = [
    "BUILTIN_SCRIPTS",
    "REPO_NAMESPACE",
    "ArgSpec",
    "Catalog",
    "RepoSpec",
    "ScriptSpec",
    "repo_id_for",
]


@dataclass
class Catalog:
    repos: dict[str, RepoSpec] = field(default_factory=dict)
    scripts: dict[str, ScriptSpec] = field(default_factory=dict)
    allowed_repo_paths: tuple[str, ...] = ()
    allowed_git_url_prefixes: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings, *, builtins: bool = True) -> Catalog:
        """Validates every repo and script table; `builtins=False` leaves out `BUILTIN_SCRIPTS`."""
        config_file = config_source(settings.config)
        repos = {name: parse_repo(name, raw, config_file=config_file) for name, raw in settings.repos.items()}
        raw_scripts = dict(BUILTIN_SCRIPTS) if builtins else {}
        raw_scripts.update(settings.scripts)
        timeout = settings.default_timeout_seconds
        scripts = {
            key: parse_script(key, raw, default_timeout=timeout, repos=repos, config_file=config_file)
            for key, raw in raw_scripts.items()
        }
        return cls(repos, scripts, settings.allowed_repo_paths, settings.allowed_git_url_prefixes)

    def repo(self, *, repo_id: str | None = None, name: str | None = None) -> RepoSpec:
        """The repo by id or by name (given both, they must agree); `InvalidRequest` when unknown."""
        if repo_id is None and name is None:
            raise InvalidRequest(
                "repo_id or repo is required",
                errors=[{"loc": ["body", "repo_id"], "msg": "repo_id or repo is required"}],
            )
        by_id = by_name = None
        if repo_id is not None:
            wanted = str(repo_id).lower()
            by_id = next((r for r in self.repos.values() if r.id == wanted), None)
            if by_id is None:
                raise InvalidRequest(f"unknown repo {clip(repo_id)!r}", errors=_at("repo_id", "unknown repo"))
        if name is not None:
            by_name = self.repos.get(name) if isinstance(name, str) else None
            if by_name is None:
                enabled = [r.name for r in self.repos.values() if r.enabled]
                raise InvalidRequest(
                    f"unknown repo {clip(name)!r}{_known(name, enabled, 'repos')}",
                    errors=_at("repo", "unknown repo"),
                )
        if by_id is not None and by_name is not None and by_id is not by_name:
            raise InvalidRequest(
                "repo_id and repo name different repos", errors=_at("repo", "names another repo than repo_id")
            )
        found = by_id or by_name
        assert found is not None
        return found

    def filter_repo_id(self, value: str) -> str:
        """The repo id a job list's `repo_id` filter means: a configured repo's name (exact, as a
        create's `repo`; it wins), else a repo id in any case, configured or not (the jobs of a
        repo since removed from runner.toml keep its id). Anything else matches no job ever: an
        `InvalidRequest` that says what the filter takes, not a silently empty list."""
        named = self.repos.get(value)
        if named is not None:
            return named.id
        wanted = value.lower()
        if is_id_text(wanted):
            return wanted
        raise InvalidRequest(
            f"unknown repo {clip(value)!r}: repo_id takes a repo's id or its name (GET /api/runner/repos)",
            errors=[{"loc": ["query", "repo_id"], "msg": "unknown repo"}],
        )

    def script(self, key: str) -> ScriptSpec:
        spec = self.scripts.get(key) if isinstance(key, str) else None
        if spec is None:
            raise UnknownScript(
                f"unknown script {clip(key)!r}{_known(key, self.scripts, 'scripts')}",
                errors=_at("script_key", "unknown script"),
            )
        return spec

    def resolve(
        self, *, repo_id: str | None, repo_name: str | None, script_key: str, args: Any
    ) -> tuple[RepoSpec, ScriptSpec, dict[str, Any]]:
        """Everything a job request needs, checked in order: repo, enabled, allowlist, script, args."""
        repo = self.repo(repo_id=repo_id, name=repo_name)
        if not repo.enabled:
            raise RepoDisabled(f"repo {repo.name!r} is disabled")
        self.check_allowed(repo)
        script = self.script(script_key)
        if not script.allows_repo(repo.name):
            raise Forbidden(f"script {script.key!r} may not run on repo {repo.name!r}")
        return repo, script, script.validate_args(args)

    def check_allowed(self, repo: RepoSpec) -> None:
        """`RepoNotAllowed` unless the repo is inside the allowlists (an empty allowlist allows all).

        A file:// URL reads the local disk, so it must satisfy RUNNER_ALLOWED_REPO_PATHS as well.
        """
        is_url = repo.source_type == "git_url"
        local_path: str | None = repo.source
        if is_url:
            local_path = (
                unquote(urlsplit(repo.source).path) if repo.source.lower().startswith("file:") else None
            )
        paths, prefixes = self.allowed_repo_paths, self.allowed_git_url_prefixes
        if local_path is not None and paths and not _path_inside(local_path, paths):
            raise RepoNotAllowed(f"repo {repo.name!r} is outside RUNNER_ALLOWED_REPO_PATHS")
        if is_url and prefixes and not any(_url_has_prefix(repo.source, p) for p in prefixes):
            raise RepoNotAllowed(f"repo {repo.name!r} is outside RUNNER_ALLOWED_GIT_URL_PREFIXES")

    def check_push_target(self, repo: RepoSpec, url: str) -> None:
        """`RepoNotAllowed` unless a local repo's push target (its `remote.origin.url`, read from a
        config that an agent in a worktree or in_place workspace can rewrite) is a place the
        allowlists would accept as a repo's source: the push goes nowhere the operator did not allow."""
        try:
            self.check_allowed(_push_target_spec(repo, url))
        except RepoNotAllowed as exc:
            raise RepoNotAllowed(f"the push target of {exc.message.removeprefix('repo ')}") from None


def _push_target_spec(repo: RepoSpec, url: str) -> RepoSpec:
    source_type = "local_path" if url.startswith("/") else "git_url"
    return dataclasses.replace(repo, source=url, source_type=source_type)


def _path_inside(path: str, allowed: Iterable[str]) -> bool:
    # realpath on both sides, compared by components: "..", symlinks and "/srv/gitx" cannot slip through.
    real = _real(path)
    return any(a and real.is_relative_to(_real(a)) for a in allowed)


@functools.lru_cache(maxsize=1024)
def _real(path: str) -> Path:
    # Repo sources and allowlists are configuration, loaded once per process like the catalog:
    # resolved once, not on every job request (realpath walks every component with lstat).
    return Path(os.path.realpath(path))


def _canonical_url(url: str) -> str | None:
    """scheme://host[:port]/path without userinfo, host case-folded, path decoded; None if dubious."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    path = unquote(parts.path)
    if any(seg in {".", ".."} for seg in path.split("/")):
        return None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme.lower()}://{netloc}{path}"


def _url_has_prefix(url: str, prefix: str) -> bool:
    u, p = _canonical_url(url), _canonical_url(prefix)
    if u is None or p is None or not u.startswith(p):
        return False
    # A prefix ends at a path boundary: "https://h/acme" must not admit "https://h/acme-evil".
    return len(u) == len(p) or p.endswith("/") or u[len(p)] == "/"


def _at(field: str, msg: str) -> list[dict[str, Any]]:
    """The `errors` of a 400 about one field of the create body (SPEC §4)."""
    return [{"loc": ["body", field], "msg": msg}]


#: How many names an unknown repo's or script's error lists: enough to spot a typo, not the
#: catalog (GET /api/runner/repos and /scripts list it, to the same users).
KNOWN_NAMES_SHOWN = 5


def _known(given: object, names: Iterable[str], kind: str) -> str:
    """What to add to "unknown repo 'x'": the configured name it is a typo of, if one is close,
    else the first few names; and where the whole list is. "unknown repo 'dmeo'" alone sent the
    user to the docs for a name they had one letter wrong."""
    listed = sorted(names)
    where = f"GET /api/runner/{kind} lists them"
    if not listed:
        return f" (none is configured; {where})"
    # A long name is no typo of a configured one (and matching it would cost for nothing).
    close = (
        difflib.get_close_matches(given, listed, n=1) if isinstance(given, str) and len(given) <= 200 else []
    )
    if close:
        return f": did you mean {clip(close[0])!r}? ({where})"
    shown = ", ".join(clip(n) for n in listed[:KNOWN_NAMES_SHOWN])
    more = f" and {len(listed) - KNOWN_NAMES_SHOWN} more" if len(listed) > KNOWN_NAMES_SHOWN else ""
    return f" (configured: {shown}{more}; {where})"
