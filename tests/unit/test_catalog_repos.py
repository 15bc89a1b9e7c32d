"""Repos: parsing and config errors, stable ids, public shapes, allowlists, and `Catalog.resolve`."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from codex_runner.catalog import REPO_NAMESPACE, Catalog, RepoSpec
from codex_runner.config import Settings
from codex_runner.errors import (
    ConfigError,
    Forbidden,
    InvalidArgs,
    InvalidRequest,
    RepoDisabled,
    RepoNotAllowed,
    UnknownScript,
)


def catalog(repos: dict[str, Any], scripts: dict[str, Any] | None = None, **settings: Any) -> Catalog:
    return Catalog.from_settings(Settings(repos=repos, scripts=scripts or {}, **settings), builtins=False)


def repo(source: str, **extra: Any) -> RepoSpec:
    return catalog({"r": {"source": source, **extra}}).repos["r"]


def config_error(raw: Any, name: str = "r") -> str:
    with pytest.raises(ConfigError) as exc:
        catalog({name: raw})
    return str(exc.value)


# ------------------------------------------------------------------------------------------ parsing


def test_local_repo_defaults() -> None:
    r = repo("/srv/git/widgets/")
    assert r == RepoSpec(
        id=str(uuid.uuid5(REPO_NAMESPACE, "r")),
        name="r",
        source="/srv/git/widgets",
        source_type="local_path",
        branch="main",
        workspace="worktree",
        enabled=True,
        commit=True,
        push=False,
        credential=None,
        risk_policy="conservative",
    )


def test_url_repo_defaults_to_clone_and_keeps_all_settings() -> None:
    r = repo(
        "https://github.com/acme/widgets.git",
        branch="release/1.x",
        enabled=False,
        push=True,
        credential="github",
        risk_policy="permissive",
    )
    assert (r.source_type, r.workspace, r.branch, r.enabled) == ("git_url", "clone", "release/1.x", False)
    assert (r.commit, r.push, r.credential, r.risk_policy) == (True, True, "github", "permissive")


@pytest.mark.parametrize(
    ("source", "workspace"),
    [("/srv/w", "in_place"), ("/srv/w", "scratch"), ("/srv/w", "clone"), ("ssh://h/w", "scratch")],
)
def test_workspace_modes(source: str, workspace: str) -> None:
    assert repo(source, workspace=workspace).workspace == workspace


def test_ids_are_stable_and_distinct() -> None:
    a = catalog({"a": {"source": "/srv/a"}, "b": {"source": "/srv/a"}})
    again = catalog({"a": {"source": "/elsewhere"}})
    # Pinned: a changed namespace would orphan every stored job's repo_id.
    assert a.repos["a"].id == "4799d874-4ea4-5bdb-9f6a-27688cf87a51"
    assert a.repos["a"].id == again.repos["a"].id != a.repos["b"].id
    assert uuid.UUID(a.repos["a"].id).version == 5


def test_missing_local_path_is_not_a_config_error(tmp_path: Path) -> None:
    assert repo(str(tmp_path / "not-there")).source == str(tmp_path / "not-there")


@pytest.mark.parametrize(
    "source",
    [
        "https://github.com/acme/w.git",
        "ssh://git@github.com/acme/w.git",
        "ssh://git@[::1]:2222/w.git",
        "file:///srv/git/w",
        "HTTPS://GitHub.com/acme/w",
        "http://127.0.0.1:8080/git/w.git",
        "http://localhost/w.git",
        "http://127.1.2.3/w.git",
        "http://[::1]:8080/w.git",
    ],
)
def test_accepted_urls(source: str) -> None:
    assert repo(source).source_type == "git_url"


BAD_SOURCES = [
    ("relative/path", "must be an absolute local path or an https://, ssh:// or file:// URL"),
    ("~/git/w", "must be an absolute local path"),
    ("-oProxyCommand=x", "must not start with '-'"),
    ("--upload-pack=touch /tmp/x", "must not start with '-'"),
    ("ext::sh -c touch% /tmp/pwned", "remote-helper transports"),
    ("fd::17", "remote-helper transports"),
    ("git@github.com:acme/w.git", "scp-like addresses are refused"),
    ("http://github.com/acme/w", "scheme http:// is refused"),
    ("http://10.0.0.1/acme/w", "scheme http:// is refused"),
    ("http://127.attacker.example/w.git", "scheme http:// is refused"),  # a name, not an address
    ("http://127.0.0.1.nip.io/w.git", "scheme http:// is refused"),
    ("git://github.com/acme/w", "scheme git:// is refused"),
    ("ftp://h/w", "scheme ftp:// is refused"),
    ("https://github.com/acme/w?x=1", "must not have a query or fragment"),
    ("https://github.com/acme/w#frag", "must not have a query or fragment"),
    ("https://user:ghp_secret@github.com/acme/w", "must not embed a password"),
    ("https://github.com/acme/../evil/w", "must not contain '.' or '..' path segments"),
    ("https://github.com/acme/%2e%2e/evil", "must not contain '.' or '..' path segments"),
    ("https://github.com", "needs a repository path"),
    ("https:///w", "needs a valid host name"),
    ("ssh://-oProxyCommand=touch/w", "needs a valid host name"),
    ("ssh://-x@host/w", "user name must not start with '-'"),
    ("https://exa mple.com/w", "must not contain spaces or control characters"),
    ("https://h:99999/w", "is not a valid URL"),
    ("file://host/srv/w", "file:// URLs need an absolute path and no host"),
    ("file:///srv/%2e%2e/w", "must not contain '.' or '..'"),
    ("file:///srv/my%20repo", "must not be percent-encoded"),
    ("/srv/git/../etc", "must not contain '..'"),
    ("/srv/git/w\nx", "must not contain control characters"),
]


@pytest.mark.parametrize(("source", "expected"), BAD_SOURCES)
def test_bad_sources(source: str, expected: str) -> None:
    message = config_error({"source": source})
    assert message.startswith("runner.toml [repos.r].source: ")
    assert expected in message


@pytest.mark.parametrize(
    "branch",
    ["", "-main", "/main", "main/", "a..b", "a b", "a\tb", "a~1", "a^", "a:b", "a?", "a*", "a[", "a\\b",
     "x@{1}", "@", "main.lock", "a/.hidden", "a//b", "main.", "x" * 201],
)  # fmt: skip
def test_bad_branches(branch: str) -> None:
    assert config_error({"source": "/srv/w", "branch": branch}).startswith("runner.toml [repos.r].branch: ")


@pytest.mark.parametrize("branch", ["main", "release/1.x", "feature/a-b_c", "v1.2.3", "runner/0f6c1a2b"])
def test_good_branches(branch: str) -> None:
    assert repo("/srv/w", branch=branch).branch == branch


BAD_REPOS: list[tuple[Any, str]] = [
    ({}, "[repos.r].source: is required"),
    ({"source": ""}, "[repos.r].source: is required"),
    ({"source": 5}, "[repos.r].source: must be a string"),
    ({"source": "/srv/w", "path": "/x"}, "[repos.r].path: unknown key (expected one of: branch, commit,"),
    ({"source": "/srv/w", "workspace": "docker"}, "[repos.r].workspace: must be one of: worktree, clone,"),
    ({"source": "https://h/w", "workspace": "in_place"}, "[repos.r].workspace: in_place needs a local path"),
    ({"source": "/srv/w", "enabled": "yes"}, "[repos.r].enabled: must be true or false"),
    ({"source": "/srv/w", "commit": 1}, "[repos.r].commit: must be true or false"),
    ({"source": "/srv/w", "push": "false"}, "[repos.r].push: must be true or false"),
    ({"source": "/srv/w", "push": True, "commit": False}, "[repos.r].push: push = true needs commit = true"),
    ({"source": "/srv/w", "credential": "a b"}, "[repos.r].credential: must be a credential name"),
    ({"source": "/srv/w", "credential": 1}, "[repos.r].credential: must be a string"),
    ({"source": "/srv/w", "risk_policy": "yolo"}, "[repos.r].risk_policy: must be one of: conservative,"),
    ({"source": "/srv/w", "branch": 1}, "[repos.r].branch: must be a string"),
    ("/srv/w", "[repos.r]: must be a table"),
]


@pytest.mark.parametrize(("raw", "expected"), BAD_REPOS)
def test_repo_config_errors_name_the_toml_path(raw: Any, expected: str) -> None:
    assert f"runner.toml {expected}" in config_error(raw)


@pytest.mark.parametrize("name", ["-x", ".hidden", "a b", "a/b", "x" * 101])
def test_bad_repo_names(name: str) -> None:
    assert "repo names are 1-100 letters" in config_error({"source": "/srv/w"}, name)


def test_quoted_repo_name_in_error_path() -> None:
    assert config_error({"source": "rel"}, "a.b").startswith('runner.toml [repos."a.b"].source: ')


# ------------------------------------------------------------------------------------ public shapes


@pytest.mark.parametrize(
    ("source", "public"),
    [
        ("ssh://git@github.com/acme/w.git", "ssh://github.com/acme/w.git"),
        ("ssh://git@[::1]:2222/w.git", "ssh://[::1]:2222/w.git"),
        ("https://oauth2@gitlab.com/acme/w", "https://gitlab.com/acme/w"),
        ("https://github.com/acme/w", "https://github.com/acme/w"),
        ("file:///srv/git/w", "file:///srv/git/w"),
        ("/srv/git/w", "/srv/git/w"),
    ],
)
def test_public_url_strips_userinfo(source: str, public: str) -> None:
    assert repo(source).public_url() == public


def test_public_url_strips_credentials_from_a_hand_built_spec() -> None:
    spec = RepoSpec(
        id="x",
        name="x",
        source="https://user:ghp_tok@github.com/acme/w.git?token=abc#f",
        source_type="git_url",
        branch="main",
        workspace="clone",
        enabled=True,
        commit=True,
        push=False,
        credential=None,
    )
    assert spec.public_url() == "https://github.com/acme/w.git"
    assert "ghp_tok" not in str(spec.to_public())


def test_repo_to_public_shape() -> None:
    r = repo("ssh://git@github.com/acme/w.git", credential="github", push=True)
    assert r.to_public() == {
        "id": r.id,
        "name": "r",
        "source_type": "git_url",
        "path_or_url": "ssh://github.com/acme/w.git",
        "branch": "main",
        "workspace": "clone",
        "enabled": True,
    }


# ------------------------------------------------------------------------------------------- allowlists


def allowed(source: str, *, paths: tuple[str, ...] = (), prefixes: tuple[str, ...] = ()) -> bool:
    cat = catalog({"r": {"source": source}}, allowed_repo_paths=paths, allowed_git_url_prefixes=prefixes)
    try:
        cat.check_allowed(cat.repos["r"])
    except RepoNotAllowed:
        return False
    return True


def test_unset_allowlists_allow_everything() -> None:
    assert allowed("/anywhere/w")
    assert allowed("https://anywhere.example/w")


def test_path_allowlist_compares_whole_components(tmp_path: Path) -> None:
    (tmp_path / "git" / "w").mkdir(parents=True)
    (tmp_path / "gitx" / "w").mkdir(parents=True)
    root = str(tmp_path / "git")
    assert allowed(str(tmp_path / "git" / "w"), paths=(root,))
    assert allowed(root, paths=(root,))
    assert allowed(str(tmp_path / "git" / "w"), paths=(root + "/",))
    assert not allowed(str(tmp_path / "gitx" / "w"), paths=(root,))
    assert not allowed(str(tmp_path), paths=(root,))


def test_path_allowlist_resolves_symlinks(tmp_path: Path) -> None:
    (tmp_path / "git").mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "git" / "escape").symlink_to(tmp_path / "secret")
    (tmp_path / "link-to-git").symlink_to(tmp_path / "git")
    (tmp_path / "git" / "w").mkdir()
    assert not allowed(str(tmp_path / "git" / "escape"), paths=(str(tmp_path / "git"),))
    assert not allowed(str(tmp_path / "git" / "escape" / "w"), paths=(str(tmp_path / "git"),))
    # A symlinked allowlist entry or source that lands inside is fine.
    assert allowed(str(tmp_path / "git" / "w"), paths=(str(tmp_path / "link-to-git"),))
    assert allowed(str(tmp_path / "link-to-git" / "w"), paths=(str(tmp_path / "git"),))


def test_dotdot_escape_refused_on_a_hand_built_spec(tmp_path: Path) -> None:
    (tmp_path / "git").mkdir()
    cat = Catalog(allowed_repo_paths=(str(tmp_path / "git"),))
    spec = RepoSpec(
        "x", "x", f"{tmp_path}/git/../other", "local_path", "main", "worktree", True, True, False, None
    )
    with pytest.raises(RepoNotAllowed, match="outside RUNNER_ALLOWED_REPO_PATHS"):
        cat.check_allowed(spec)


def test_path_allowlist_does_not_govern_remote_urls(tmp_path: Path) -> None:
    assert allowed("https://github.com/acme/w", paths=(str(tmp_path),))


def test_file_urls_must_satisfy_both_allowlists(tmp_path: Path) -> None:
    inside, outside = f"file://{tmp_path}/git/w", f"file://{tmp_path}/other/w"
    (tmp_path / "git").mkdir()
    assert allowed(inside, paths=(str(tmp_path / "git"),))
    assert not allowed(outside, paths=(str(tmp_path / "git"),))
    assert allowed(inside, prefixes=(f"file://{tmp_path}/git/",))
    assert not allowed(outside, prefixes=(f"file://{tmp_path}/git/",))


@pytest.mark.parametrize(
    ("source", "prefix", "ok"),
    [
        ("https://github.com/acme/w", "https://github.com/acme/", True),
        ("https://github.com/acme/w", "https://github.com/acme", True),
        ("https://github.com/acme", "https://github.com/acme", True),
        ("https://github.com/acme-evil/w", "https://github.com/acme", False),
        ("https://github.com/acmex/w", "https://github.com/acme", False),
        ("https://github.com.evil.com/acme/w", "https://github.com", False),
        ("https://github.com:8443/acme/w", "https://github.com", False),
        ("https://github.com/acme/w", "https://github.com", True),
        ("https://GitHub.COM/acme/w", "https://github.com/acme/", True),
        ("https://github.com/Acme/w", "https://github.com/acme/", False),
        ("https://oauth2@github.com/acme/w", "https://github.com/acme/", True),
        ("ssh://git@github.com/acme/w", "ssh://git@github.com/acme/", True),
        ("ssh://git@github.com/acme/w", "https://github.com/acme/", False),
        ("https://github.com/acme/w", "ssh://github.com/acme/", False),
        ("https://github.com/acme%2Fw", "https://github.com/acme/", True),
        ("https://evil.com/https://github.com/acme/w", "https://github.com/acme/", False),
    ],
)
def test_url_prefix_allowlist(source: str, prefix: str, ok: bool) -> None:
    assert allowed(source, prefixes=(prefix,)) is ok


def test_url_prefix_allowlist_refuses_dot_segments_on_a_hand_built_spec() -> None:
    cat = Catalog(allowed_git_url_prefixes=("https://github.com/acme/",))
    spec = RepoSpec(
        "x", "x", "https://github.com/acme/../evil/w", "git_url", "main", "clone", True, True, False, None
    )
    with pytest.raises(RepoNotAllowed, match="outside RUNNER_ALLOWED_GIT_URL_PREFIXES"):
        cat.check_allowed(spec)


def test_any_listed_entry_allows(tmp_path: Path) -> None:
    assert allowed("https://gitlab.com/x/w", prefixes=("https://github.com/", "https://gitlab.com/x/"))
    assert allowed(str(tmp_path / "b" / "w"), paths=(str(tmp_path / "a"), str(tmp_path / "b")))


# ------------------------------------------------------------------------------------------ resolve


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    (tmp_path / "git").mkdir()
    return catalog(
        {
            "widgets": {"source": str(tmp_path / "git" / "widgets")},
            "gadgets": {"source": str(tmp_path / "git" / "gadgets")},
            "off": {"source": str(tmp_path / "git" / "off"), "enabled": False},
            "outside": {"source": str(tmp_path / "elsewhere")},
        },
        {
            "echo": {"command": ["echo", "{msg}"], "args": {"msg": {"type": "string", "required": True}}},
            "only.widgets": {"command": ["true"], "repos": ["widgets"]},
        },
        allowed_repo_paths=(str(tmp_path / "git"),),
    )


def test_the_list_filter_takes_a_name_or_an_id(tmp_path: Path) -> None:
    """`GET /jobs?repo_id=`: a configured name (exact; it wins over an id, as a repo may be named
    like one), else an id in any case, configured or not; anything else is a 400."""
    other_id = str(uuid.uuid4())
    cat = catalog({"widgets": {"source": str(tmp_path)}, other_id: {"source": str(tmp_path)}})
    widgets = cat.repos["widgets"]
    assert cat.filter_repo_id("widgets") == cat.filter_repo_id(widgets.id.upper()) == widgets.id
    assert cat.filter_repo_id(other_id) == cat.repos[other_id].id != other_id
    gone = str(uuid.uuid4())  # a repo since removed from runner.toml: its jobs keep its id
    assert cat.filter_repo_id(gone.upper()) == gone
    for bad in ("Widgets", "nope", "{" + gone + "}", gone.replace("-", ""), "a\x00b", ""):
        with pytest.raises(InvalidRequest) as caught:
            cat.filter_repo_id(bad)
        assert caught.value.errors == [{"loc": ["query", "repo_id"], "msg": "unknown repo"}], bad


def test_resolve_by_name_and_by_id(cat: Catalog) -> None:
    widgets = cat.repos["widgets"]
    repo_, script_, args = cat.resolve(
        repo_id=None, repo_name="widgets", script_key="echo", args={"msg": "hi"}
    )
    assert (repo_, script_.key, args) == (widgets, "echo", {"msg": "hi"})
    assert cat.resolve(repo_id=widgets.id, repo_name=None, script_key="echo", args={"msg": "x"})[0] is widgets
    assert cat.resolve(repo_id=widgets.id.upper(), repo_name="widgets", script_key="echo", args={"msg": "x"})[
        0
    ]
    assert cat.repo(name="widgets") is cat.repo(repo_id=widgets.id) is widgets


@pytest.mark.parametrize(
    ("kwargs", "error", "code", "message"),
    [
        ({"repo_name": "ghost"}, InvalidRequest, "invalid_request", "unknown repo 'ghost'"),
        ({"repo_id": str(uuid.uuid4())}, InvalidRequest, "invalid_request", "unknown repo"),
        (
            {"repo_id": None, "repo_name": None},
            InvalidRequest,
            "invalid_request",
            "repo_id or repo is required",
        ),
        ({"repo_name": "off"}, RepoDisabled, "repo_disabled", "repo 'off' is disabled"),
        ({"repo_name": "outside"}, RepoNotAllowed, "repo_not_allowed", "outside RUNNER_ALLOWED_REPO_PATHS"),
        (
            {"repo_name": "widgets", "script_key": "nope"},
            UnknownScript,
            "unknown_script",
            "unknown script 'nope'",
        ),
        (
            {"repo_name": "gadgets", "script_key": "only.widgets"},
            Forbidden,
            "forbidden",
            "script 'only.widgets' may not run on repo 'gadgets'",
        ),
        ({"repo_name": "widgets", "args": {}}, InvalidArgs, "invalid_args", "msg: is required"),
        ({"repo_name": "widgets", "args": None}, InvalidArgs, "invalid_args", "args must be an object"),
    ],
)
def test_resolve_errors(
    cat: Catalog, kwargs: dict[str, Any], error: type[Exception], code: str, message: str
) -> None:
    call: dict[str, Any] = {"repo_id": None, "repo_name": None, "script_key": "echo", "args": {"msg": "x"}}
    call.update(kwargs)
    with pytest.raises(error) as exc:
        cat.resolve(**call)
    assert type(exc.value) is error
    assert getattr(exc.value, "code", None) == code
    assert message in str(exc.value)


def test_resolve_refuses_id_and_name_that_disagree(cat: Catalog) -> None:
    with pytest.raises(InvalidRequest, match="different repos"):
        cat.resolve(
            repo_id=cat.repos["gadgets"].id, repo_name="widgets", script_key="echo", args={"msg": "x"}
        )


def test_resolve_survives_non_string_client_input(cat: Catalog) -> None:
    with pytest.raises(InvalidRequest):
        cat.resolve(repo_id=None, repo_name=["widgets"], script_key="echo", args={})  # type: ignore[arg-type]
    with pytest.raises(UnknownScript):
        cat.resolve(repo_id=None, repo_name="widgets", script_key={"k": 1}, args={})  # type: ignore[arg-type]


def test_long_unknown_names_are_clipped_in_messages(cat: Catalog) -> None:
    with pytest.raises(InvalidRequest) as exc:
        cat.repo(name="x" * 10_000)
    # The name echoed is cut at 80 characters; the rest names the configured repos (a few, each cut).
    assert "x" * 80 + "…" in exc.value.message and "x" * 81 not in exc.value.message
    assert len(exc.value.message) < 250


def test_script_key_lookup() -> None:
    cat = catalog({}, {"a.b": {"command": ["true"]}})
    assert cat.script("a.b").key == "a.b"
    with pytest.raises(UnknownScript, match="unknown script 'a'"):
        cat.script("a")


def test_a_local_repos_push_target_must_pass_the_allowlists(tmp_path: Path) -> None:
    """A local repo pushes to its `remote.origin.url`, which an agent in a worktree or in_place
    workspace can rewrite: the target must be a place the allowlists accept as a source."""
    (tmp_path / "git" / "w").mkdir(parents=True)
    (tmp_path / "git" / "origin.git").mkdir()
    (tmp_path / "agent" / "evil.git").mkdir(parents=True)
    cat = catalog(
        {"r": {"source": str(tmp_path / "git" / "w")}},
        allowed_repo_paths=(str(tmp_path / "git"),),
        allowed_git_url_prefixes=("https://github.com/acme/",),
    )
    repo = cat.repos["r"]
    cat.check_push_target(repo, str(tmp_path / "git" / "origin.git"))
    cat.check_push_target(repo, "https://github.com/acme/w.git")
    for target in (
        str(tmp_path / "agent" / "evil.git"),
        f"file://{tmp_path}/agent/evil.git",
        "https://evil.example/w.git",
        "ssh://git@evil.example/w.git",
    ):
        with pytest.raises(RepoNotAllowed, match="push target of 'r' is outside RUNNER_ALLOWED"):
            cat.check_push_target(repo, target)
    # No allowlist: anything goes, as for sources.
    open_cat = catalog({"r": {"source": str(tmp_path / "git" / "w")}})
    open_cat.check_push_target(open_cat.repos["r"], str(tmp_path / "agent" / "evil.git"))


# ------------------------------------------------------------------- unknown names: what to write


def _unknown(cat: Catalog, **kwargs: str) -> str:
    with pytest.raises((InvalidRequest, UnknownScript)) as caught:
        if "script" in kwargs:
            cat.script(kwargs["script"])
        else:
            cat.repo(name=kwargs["name"])
    return caught.value.message


def test_an_unknown_name_close_to_a_configured_one_asks_for_it() -> None:
    cat = catalog(
        {"widgets": {"source": "/srv/w"}, "gadgets": {"source": "/srv/g"}},
        {"codex.review": {"command": ["true"]}, "lint": {"command": ["true"]}},
    )
    assert _unknown(cat, name="widgest") == (
        "unknown repo 'widgest': did you mean 'widgets'? (GET /api/runner/repos lists them)"
    )
    assert _unknown(cat, script="codex.reveiw") == (
        "unknown script 'codex.reveiw': did you mean 'codex.review'? (GET /api/runner/scripts lists them)"
    )


def test_an_unknown_name_like_none_lists_the_first_few_enabled_ones() -> None:
    repos: dict[str, Any] = {f"repo{i}": {"source": f"/srv/{i}"} for i in range(7)}
    repos["hidden"] = {"source": "/srv/h", "enabled": False}  # GET /repos does not list it either
    message = _unknown(catalog(repos), name="zzz")
    assert message == (
        "unknown repo 'zzz' (configured: repo0, repo1, repo2, repo3, repo4 and 2 more; "
        "GET /api/runner/repos lists them)"
    )
    assert _unknown(catalog({"only": {"source": "/srv/o"}}), name="zzz") == (
        "unknown repo 'zzz' (configured: only; GET /api/runner/repos lists them)"
    )
    assert "none is configured" in _unknown(catalog({}), name="zzz")


def test_a_hostile_unknown_name_stays_one_short_line() -> None:
    cat = catalog({"widgets": {"source": "/srv/w"}})
    message = _unknown(cat, name="widgets" + "x" * 100_000)
    assert "did you mean" not in message and len(message) < 200
    assert "\n" not in _unknown(cat, name="wid\ngets")
