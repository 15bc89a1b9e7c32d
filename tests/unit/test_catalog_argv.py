"""Script templates: argv assembly (whole-element placeholders, flags, never a shell), stdin, config errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from codex_runner.catalog import BUILTIN_SCRIPTS, Catalog, ScriptSpec
from codex_runner.config import Settings, load_settings
from codex_runner.errors import ConfigError

BUILTINS = {"workspace": "/ws/job", "job_id": "0f6c-job", "repo": "widgets", "branch": "main"}


def catalog(scripts: dict[str, Any], repos: dict[str, Any] | None = None, **settings: Any) -> Catalog:
    return Catalog.from_settings(Settings(scripts=scripts, repos=repos or {}, **settings), builtins=False)


def script(command: list[str], args: dict[str, Any] | None = None, **extra: Any) -> ScriptSpec:
    return catalog({"t": {"command": command, "args": args or {}, **extra}}).scripts["t"]


def argv(spec: ScriptSpec, raw: dict[str, Any]) -> list[str]:
    return spec.build_argv(spec.validate_args(raw), **BUILTINS)


def config_error(scripts: dict[str, Any], repos: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        catalog(scripts, repos)
    return str(exc.value)


# --------------------------------------------------------------------------------------------- argv


def test_placeholders_and_builtins_are_replaced_as_whole_elements() -> None:
    spec = script(
        ["tool", "-C", "{workspace}", "--job", "{job_id}", "{repo}", "{branch}", "{name}"],
        {"name": {"type": "string", "required": True}},
    )
    assert argv(spec, {"name": "a b c"}) == [
        "tool",
        "-C",
        "/ws/job",
        "--job",
        "0f6c-job",
        "widgets",
        "main",
        "a b c",
    ]


@pytest.mark.parametrize("value", ["; rm -rf /", "$(id)", "`id`", "a\nb", "*", "~", "'\"", "{workspace}", ""])
def test_hostile_values_stay_one_inert_element(value: str) -> None:
    spec = script(["tool", "{s}", "end"], {"s": {"type": "string", "required": True}})
    assert argv(spec, {"s": value}) == ["tool", value, "end"]


def test_values_reach_the_process_byte_for_byte_without_a_shell(tmp_path: Path) -> None:
    spec = script(
        [sys.executable, "-c", "import sys; print(repr(sys.argv[1:]))", "{s}"], {"s": {"type": "string"}}
    )
    value = "; touch pwned $(touch pwned2) `touch pwned3`\nline2"
    out = subprocess.run(argv(spec, {"s": value}), cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == repr([value])
    assert list(tmp_path.iterdir()) == []


def test_absent_optional_placeholder_drops_its_element() -> None:
    spec = script(["tool", "{path}", "end"], {"path": {"type": "string"}})
    assert argv(spec, {}) == ["tool", "end"]
    assert argv(spec, {"path": ""}) == ["tool", "", "end"]


def test_defaults_fill_placeholders() -> None:
    spec = script(["tool", "{n}"], {"n": {"type": "int", "default": 7}})
    assert argv(spec, {}) == ["tool", "7"]


def test_args_missing_their_default_value_fall_back_to_it() -> None:
    # Stored job args may leave out values equal to their default (the idempotency payload does).
    spec = script(
        ["tool", "{n}"],
        {"n": {"type": "int", "default": 7}, "v": {"type": "bool", "default": True, "flag": "-v"}},
    )
    assert spec.build_argv({}, **BUILTINS) == ["tool", "7", "-v"]
    fed = script(["cat"], {"p": {"type": "string", "default": "hi"}}, stdin="{p}")
    assert fed.build_stdin({}) == b"hi"


def test_flags_are_appended_in_declaration_order() -> None:
    spec = script(
        ["codex", "exec", "-"],
        {
            "model": {"type": "string", "flag": "--model"},
            "effort": {"type": "enum", "choices": ["low", "high"], "flag": "-e"},
            "n": {"type": "int", "flag": "--n"},
        },
    )
    assert argv(spec, {}) == ["codex", "exec", "-"]
    assert argv(spec, {"n": 3, "model": "o3"}) == ["codex", "exec", "-", "--model", "o3", "--n", "3"]
    assert argv(spec, {"effort": "low"}) == ["codex", "exec", "-", "-e", "low"]


def test_bool_flag_alone_when_true_nothing_when_false() -> None:
    spec = script(
        ["tool"], {"dry": {"type": "bool", "flag": "--dry-run"}, "v": {"type": "bool", "flag": "-v"}}
    )
    assert argv(spec, {"dry": True, "v": False}) == ["tool", "--dry-run"]
    assert argv(spec, {"dry": False}) == ["tool"]
    assert argv(spec, {}) == ["tool"]


def test_bool_with_default_true_flag_present_unless_disabled() -> None:
    spec = script(["tool"], {"color": {"type": "bool", "default": True, "flag": "--color"}})
    assert argv(spec, {}) == ["tool", "--color"]
    assert argv(spec, {"color": False}) == ["tool"]


def test_bool_placeholder_renders_true_false() -> None:
    spec = script(["tool", "{b}"], {"b": {"type": "bool", "required": True}})
    assert argv(spec, {"b": True}) == ["tool", "true"]
    assert argv(spec, {"b": False}) == ["tool", "false"]


def test_flag_value_is_its_own_element() -> None:
    spec = script(["tool"], {"msg": {"type": "string", "flag": "--message"}})
    assert argv(spec, {"msg": "x --upload-pack=y"}) == ["tool", "--message", "x --upload-pack=y"]


def test_literal_braces_that_are_not_placeholders_stay() -> None:
    spec = script(["jq", "{}", "{ .a }", "{1}", "x{"])
    assert argv(spec, {}) == ["jq", "{}", "{ .a }", "{1}", "x{"]


# -------------------------------------------------------------------------------------------- stdin


def test_stdin_feeds_the_argument_as_utf8() -> None:
    spec = script(["cat"], {"prompt": {"type": "string", "required": True}}, stdin="{prompt}")
    assert spec.build_stdin(spec.validate_args({"prompt": "héllo\n--x"})) == "héllo\n--x".encode()


def test_stdin_absent_optional_and_no_stdin_give_none() -> None:
    spec = script(["cat"], {"p": {"type": "string"}}, stdin="{p}")
    assert spec.build_stdin(spec.validate_args({})) is None
    assert script(["true"]).build_stdin({}) is None


def test_stdin_may_name_a_builtin() -> None:
    spec = script(["cat"], stdin="{job_id}")
    assert spec.build_stdin({}, **BUILTINS) == b"0f6c-job"


def test_stdin_arg_also_used_in_argv_follows_the_argv_rule() -> None:
    spec = script(["tool", "{p}"], {"p": {"type": "string"}}, stdin="{p}")
    assert argv(spec, {"p": "x"}) == ["tool", "x"]
    assert spec.build_stdin({"p": "x"}) == b"x"


# ----------------------------------------------------------------------------------- script config


def test_script_defaults() -> None:
    spec = catalog({"plain": {"command": ["true"]}}, default_timeout_seconds=99).scripts["plain"]
    assert (spec.key, spec.label, spec.description, spec.stdin) == ("plain", "plain", "", None)
    assert (spec.timeout_seconds, spec.env, spec.repos, dict(spec.args)) == (99, (), None, {})
    assert spec.allows_repo("anything")


def test_env_names_deduplicated_and_repos_restrict() -> None:
    spec = catalog(
        {"t": {"command": ["true"], "env": ["A", "B", "A"], "repos": ["w"]}},
        {"w": {"source": "/srv/w"}, "v": {"source": "/srv/v"}},
    ).scripts["t"]
    assert spec.env == ("A", "B")
    assert spec.allows_repo("w") and not spec.allows_repo("v")


def test_script_to_public_shape() -> None:
    spec = script(["tool", "{n}"], {"n": {"type": "int", "min": 0, "max": 5}}, label="L", timeout_seconds=5)
    assert spec.to_public() == {
        "key": "t",
        "label": "L",
        "description": "",
        "timeout_seconds": 5,
        "repos": None,
        "args": [
            {
                "name": "n",
                "type": "int",
                "required": False,
                "default": None,
                "min": 0,
                "max": 5,
                "choices": None,
                "max_length": None,
                "pattern": None,
            }
        ],
    }


def test_builtin_codex_exec_is_present_and_replaceable() -> None:
    spec = Catalog.from_settings(Settings()).scripts["codex.exec"]
    args = spec.validate_args({"prompt": "fix it", "model": "gpt-5"})
    assert spec.build_argv(args, **BUILTINS) == [
        *[
            "codex",
            "exec",
            "--json",
            "--ephemeral",
            "--sandbox",
            "workspace-write",
            "--color",
            "never",
            "-C",
            "/ws/job",
            "-",
        ],
        "--model",
        "gpt-5",
    ]
    assert spec.build_stdin(args) == b"fix it"
    assert spec.env == ("OPENAI_API_KEY", "CODEX_HOME")
    assert spec.timeout_seconds == 3600
    own = Catalog.from_settings(Settings(scripts={"codex.exec": {"command": ["codex", "exec", "-"]}}))
    assert own.scripts["codex.exec"].command == ("codex", "exec", "-")
    assert "codex.exec" in BUILTIN_SCRIPTS
    assert Catalog.from_settings(Settings(), builtins=False).scripts == {}


def test_spec_example_runner_toml_loads(tmp_path: Path) -> None:
    (tmp_path / "runner.toml").write_text(
        """
[runner]
max_concurrency = 4

[repos.widgets]
source = "/srv/git/widgets"
branch = "main"
workspace = "worktree"
enabled = true
commit = true
push = false
credential = "github"

[scripts."codex.exec"]
label = "Codex: run a prompt"
command = ["codex", "exec", "--json", "--sandbox", "workspace-write", "--color", "never", "-C", "{workspace}", "-"]
stdin = "{prompt}"
timeout_seconds = 3600
env = ["OPENAI_API_KEY", "CODEX_HOME"]
repos = ["widgets"]

[scripts."codex.exec".args.prompt]
type = "string"
required = true
max_length = 100000

[scripts."codex.exec".args.model]
type = "string"
pattern = "^[A-Za-z0-9._:-]{1,64}$"
flag = "--model"
""",
        encoding="utf-8",
    )
    cat = Catalog.from_settings(load_settings({}, cwd=tmp_path))
    spec = cat.scripts["codex.exec"]
    assert spec.repos == ("widgets",)
    assert list(spec.args) == ["prompt", "model"]
    assert spec.validate_args({"prompt": "p"}) == {"prompt": "p"}


def test_unquoted_dotted_script_key_gets_a_hint(tmp_path: Path) -> None:
    (tmp_path / "runner.toml").write_text('[scripts.codex.exec]\ncommand = ["codex"]\n', encoding="utf-8")
    with pytest.raises(
        ConfigError, match=r'\[scripts\."codex"\]: has no command; a key containing dots must be'
    ):
        Catalog.from_settings(load_settings({}, cwd=tmp_path))


BAD_SCRIPTS: list[tuple[dict[str, Any], str]] = [
    (
        {"command": ["tool", "--dir={workspace}"]},
        '[scripts."t"].command[1]: placeholder {workspace} must be a whole',
    ),
    (
        {"command": ["tool", "x{n}y"], "args": {"n": {"type": "int"}}},
        ".command[1]: placeholder {n} must be a whole",
    ),
    ({"command": ["tool", "{nope}"]}, '[scripts."t"].command[1]: unknown placeholder {nope}'),
    (
        {"command": ["{workspace}/run.sh"]},
        ".command[0]: placeholder {workspace} must be a whole argv element",
    ),
    ({"command": ["{p}"], "args": {"p": {"type": "string"}}}, ".command[0]: the program must be a literal"),
    ({"command": []}, '[scripts."t"].command: must be a non-empty list'),
    ({"command": [""]}, '[scripts."t"].command: must be a non-empty list'),
    ({"command": "tool --x"}, '[scripts."t"].command: must be a list of strings'),
    ({"command": ["tool", 5]}, '[scripts."t"].command: must be a list of strings'),
    ({"command": ["tool", "a\x00b"]}, '[scripts."t"].command: must be a list of strings'),
    ({}, '[scripts."t"].command: must be a non-empty list'),
    ({"command": ["tool"], "shell": True}, '[scripts."t"].shell: unknown key'),
    ({"command": ["tool"], "args": {"n": {"type": "int"}}}, ".args.n: is not used: put {n} in command"),
    (
        {"command": ["tool", "{n}"], "args": {"n": {"type": "int", "flag": "--n"}}},
        ".args.n.flag: {n} is also in command",
    ),
    (
        {"command": ["tool", "--", "x"], "args": {"n": {"type": "int", "flag": "--n"}}},
        ".args.n.flag: command contains '--'",
    ),
    ({"command": ["cat"], "stdin": "prompt"}, '[scripts."t"].stdin: must be one placeholder'),
    ({"command": ["cat"], "stdin": "{prompt}"}, '[scripts."t"].stdin: must be one placeholder'),
    (
        {"command": ["cat"], "stdin": "Task: {p}", "args": {"p": {"type": "string"}}},
        '[scripts."t"].stdin: must be one placeholder',
    ),
    ({"command": ["tool"], "timeout_seconds": 0}, '[scripts."t"].timeout_seconds: must be at least 1'),
    ({"command": ["tool"], "timeout_seconds": "60"}, '[scripts."t"].timeout_seconds: must be an integer'),
    ({"command": ["tool"], "env": ["OK", "BAD-NAME"]}, "[scripts.\"t\"].env: 'BAD-NAME' is not a valid"),
    ({"command": ["tool"], "env": ["1X"]}, "[scripts.\"t\"].env: '1X' is not a valid"),
    ({"command": ["tool"], "env": ["RUNNER_ENCRYPTION_KEY"]}, "RUNNER_* variables are the runner's own"),
    ({"command": ["tool"], "env": "PATH"}, '[scripts."t"].env: must be a list of strings'),
    ({"command": ["tool"], "repos": ["ghost"]}, "[scripts.\"t\"].repos: 'ghost' is not a configured repo"),
    ({"command": ["tool"], "repos": []}, '[scripts."t"].repos: must not be empty'),
    ({"command": ["tool"], "label": 5}, '[scripts."t"].label: must be a string'),
    ({"command": ["tool"], "args": {"n": 1}}, '[scripts."t"].args.n: must be a table'),
    ({"command": ["tool"], "args": []}, '[scripts."t"].args: must be a table'),
]


@pytest.mark.parametrize(("raw", "expected"), BAD_SCRIPTS)
def test_script_config_errors_name_the_toml_path(raw: dict[str, Any], expected: str) -> None:
    assert expected in config_error({"t": raw})


@pytest.mark.parametrize("key", ["", "-x", "a b", "a/b", "ünï", "x" * 129])
def test_bad_script_keys(key: str) -> None:
    assert "script keys are 1-128 letters" in config_error({key: {"command": ["true"]}})


def test_script_table_must_be_a_table() -> None:
    assert config_error({"t": "tool"}) == 'runner.toml [scripts."t"]: must be a table'


def test_dotted_keys_are_fine_when_quoted() -> None:
    assert list(catalog({"codex.exec": {"command": ["true"]}, "a_b-c.9": {"command": ["true"]}}).scripts) == [
        "codex.exec",
        "a_b-c.9",
    ]


def test_a_codex_script_with_options_before_exec_stops_start_up() -> None:
    """Not recognised as `codex exec`, such a command ran without the repo's risk policy (with
    `--yolo`, unsandboxed on a conservative repo): the configuration is refused instead."""
    message = config_error({"wild": {"command": ["codex", "--yolo", "exec", "-"]}})
    assert '[scripts."wild"].command' in message and "codex exec" in message and "risk policy" in message
    assert script(["codex", "e", "--json", "-"]).command[1] == "e"  # the alias is exec


def test_a_script_timeout_past_ten_years_stops_start_up() -> None:
    """Accepted, it made every create of the script fail with a 500 (the integer overflowed)."""
    assert "must be at most" in config_error({"slow": {"command": ["/bin/true"], "timeout_seconds": 10**20}})


def test_the_built_in_model_argument_cannot_start_with_a_dash() -> None:
    """`--dangerously-bypass-approvals-and-sandbox` passed the model pattern: the job was queued,
    then codex refused its command line (and on a conservative repo the flag was dropped, leaving
    a bare `--model`). A 400 now."""
    from codex_runner.errors import InvalidRequest

    spec = Catalog.from_settings(Settings()).scripts["codex.exec"]
    with pytest.raises(InvalidRequest):
        spec.validate_args({"prompt": "p", "model": "--dangerously-bypass-approvals-and-sandbox"})
    assert spec.validate_args({"prompt": "p", "model": "gpt-5.5"})["model"] == "gpt-5.5"
