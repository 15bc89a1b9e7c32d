"""Argument schemas: every type, bound and refusal of `ScriptSpec.validate_args`, and their config errors."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from codex_runner.catalog import ArgSpec, Catalog, ScriptSpec
from codex_runner.config import Settings
from codex_runner.errors import ConfigError, InvalidArgs


def script(args: dict[str, Any], command: list[str] | None = None, **extra: Any) -> ScriptSpec:
    """A script `t` whose args all sit in command as placeholders unless `command` says otherwise."""
    command = command or ["tool", *(f"{{{n}}}" for n in args if "flag" not in args[n])]
    raw = {"command": command, "args": args, **extra}
    return Catalog.from_settings(Settings(scripts={"t": raw}), builtins=False).scripts["t"]


def errors_of(spec: ScriptSpec, raw: Any) -> dict[str, str]:
    with pytest.raises(InvalidArgs) as exc:
        spec.validate_args(raw)
    assert exc.value.code == "invalid_args"
    return {e["loc"][-1]: e["msg"] for e in exc.value.errors}


def config_error(args: dict[str, Any], command: list[str] | None = None, **extra: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        script(args, command, **extra)
    return str(exc.value)


# ------------------------------------------------------------------------------------------------ int


def test_int_bounds_inclusive() -> None:
    spec = script({"n": {"type": "int", "min": 1, "max": 10}})
    assert spec.validate_args({"n": 1}) == {"n": 1}
    assert spec.validate_args({"n": 10}) == {"n": 10}
    assert errors_of(spec, {"n": 0}) == {"n": "must be at least 1"}
    assert errors_of(spec, {"n": 11}) == {"n": "must be at most 10"}


@pytest.mark.parametrize("value", [True, False, 1.0, 2.5, "5", "x", [1], {"a": 1}])
def test_int_refuses_bools_floats_and_strings(value: Any) -> None:
    spec = script({"n": {"type": "int", "required": True}})
    assert errors_of(spec, {"n": value}) == {"n": "must be an integer"}


def test_int_is_bounded_to_64_bits_even_without_max() -> None:
    spec = script({"n": {"type": "int"}})
    assert spec.validate_args({"n": 2**63 - 1}) == {"n": 2**63 - 1}
    assert errors_of(spec, {"n": 2**63}) == {"n": "must fit in a 64-bit integer"}
    assert errors_of(spec, {"n": 10**5000}) == {"n": "must fit in a 64-bit integer"}


def test_negative_int_in_argv_needs_a_negative_min() -> None:
    assert "negative" in errors_of(script({"n": {"type": "int"}}), {"n": -1})["n"]
    assert "negative" in errors_of(script({"n": {"type": "int", "flag": "--n"}}), {"n": -1})["n"]
    assert script({"n": {"type": "int", "min": -5}}).validate_args({"n": -5}) == {"n": -5}
    # Fed on stdin, a negative number cannot be read as an option.
    stdin_only = script({"n": {"type": "int"}}, ["tool"], stdin="{n}")
    assert stdin_only.validate_args({"n": -1}) == {"n": -1}


# ----------------------------------------------------------------------------------------- bool, enum


@pytest.mark.parametrize("value", [0, 1, "true", "false", "yes"])
def test_bool_takes_json_true_false_only(value: Any) -> None:
    spec = script({"b": {"type": "bool", "flag": "--b"}})
    assert spec.validate_args({"b": True}) == {"b": True}
    assert spec.validate_args({"b": False}) == {"b": False}
    assert errors_of(spec, {"b": value}) == {"b": "must be true or false"}


def test_enum_choices() -> None:
    spec = script({"mode": {"type": "enum", "choices": ["fast", "slow"]}})
    assert spec.validate_args({"mode": "fast"}) == {"mode": "fast"}
    assert errors_of(spec, {"mode": "FAST"}) == {"mode": "must be one of: fast, slow"}
    assert errors_of(spec, {"mode": 1}) == {"mode": "must be one of: fast, slow"}


def test_enum_choice_starting_with_dash_is_the_operators_call() -> None:
    spec = script({"v": {"type": "enum", "choices": ["-v", "-vv"]}})
    assert spec.validate_args({"v": "-vv"}) == {"v": "-vv"}


# --------------------------------------------------------------------------------------------- string


def test_string_max_length_counts_characters_not_bytes() -> None:
    spec = script({"s": {"type": "string", "max_length": 3}})
    assert spec.validate_args({"s": "ééé"}) == {"s": "ééé"}
    assert spec.validate_args({"s": "🙂🙂🙂"}) == {"s": "🙂🙂🙂"}
    assert errors_of(spec, {"s": "abcd"}) == {"s": "must be at most 3 characters"}


def test_string_pattern_is_a_full_match() -> None:
    spec = script({"m": {"type": "string", "pattern": "[a-z]+"}})
    assert spec.validate_args({"m": "gpt"}) == {"m": "gpt"}
    assert "pattern" in errors_of(spec, {"m": "gpt4"})["m"]
    assert "pattern" in errors_of(spec, {"m": "x; rm -rf /"})["m"]


def test_anchored_pattern_does_not_admit_a_trailing_newline() -> None:
    # re.match("^[a-z]+$", "abc\n") succeeds; fullmatch must not.
    spec = script({"m": {"type": "string", "pattern": "^[a-z]+$"}})
    assert "pattern" in errors_of(spec, {"m": "abc\n"})["m"]


def test_string_type_and_nul_and_surrogates() -> None:
    spec = script({"s": {"type": "string"}})
    assert errors_of(spec, {"s": 5}) == {"s": "must be a string"}
    assert errors_of(spec, {"s": "a\x00b"}) == {"s": "must not contain NUL characters"}
    assert errors_of(spec, {"s": "\ud800"}) == {"s": "must be valid Unicode text"}


def test_nul_is_refused_even_when_the_pattern_admits_it() -> None:
    spec = script({"s": {"type": "string", "pattern": "(?s).*"}})
    assert errors_of(spec, {"s": "\x00"}) == {"s": "must not contain NUL characters"}


@pytest.mark.parametrize(
    "value", ["; rm -rf /", "$(id)", "`id`", "a\nb", "a\r\nb", "x' || true '", "{workspace}"]
)
def test_shell_looking_values_are_accepted_as_inert_text(value: str) -> None:
    spec = script({"s": {"type": "string"}})
    assert spec.validate_args({"s": value}) == {"s": value}


def test_newlines_are_refused_when_the_pattern_forbids_them() -> None:
    spec = script({"s": {"type": "string", "pattern": "[^\\n]*"}})
    assert "pattern" in errors_of(spec, {"s": "a\nb"})["s"]


@pytest.mark.parametrize("value", ["--upload-pack=x", "-rf", "-", "--"])
def test_option_like_strings_are_refused_in_argv(value: str) -> None:
    assert "must not start with '-'" in errors_of(script({"s": {"type": "string"}}), {"s": value})["s"]
    flagged = script({"s": {"type": "string", "flag": "--s"}})
    assert "must not start with '-'" in errors_of(flagged, {"s": value})["s"]


def test_option_like_strings_pass_when_a_pattern_admits_them_or_on_stdin() -> None:
    admitted = script({"s": {"type": "string", "pattern": "-[a-z]+"}})
    assert admitted.validate_args({"s": "-abc"}) == {"s": "-abc"}
    stdin_only = script({"s": {"type": "string"}}, ["tool"], stdin="{s}")
    assert stdin_only.validate_args({"s": "--upload-pack=x"}) == {"s": "--upload-pack=x"}


# ------------------------------------------------------------------------ the request as a whole


def test_defaults_filled_and_absent_optionals_left_out() -> None:
    spec = script(
        {
            "n": {"type": "int", "default": 3},
            "b": {"type": "bool", "default": False, "flag": "--b"},
            "s": {"type": "string"},
        }
    )
    assert spec.validate_args({}) == {"n": 3, "b": False}
    assert spec.validate_args({"n": 4, "s": "x"}) == {"n": 4, "b": False, "s": "x"}
    assert spec.defaults() == {"n": 3, "b": False}


def test_null_counts_as_absent() -> None:
    spec = script({"n": {"type": "int", "default": 3}, "r": {"type": "string", "required": True}})
    assert spec.validate_args({"n": None, "r": "x"}) == {"n": 3, "r": "x"}
    assert errors_of(spec, {"r": None}) == {"r": "is required"}


def test_every_problem_is_listed_at_once() -> None:
    spec = script({"n": {"type": "int", "max": 1}, "r": {"type": "string", "required": True}})
    with pytest.raises(InvalidArgs) as exc:
        spec.validate_args({"n": 2, "bogus": 1, "other": 2})
    locs = [e["loc"] for e in exc.value.errors]
    assert locs == [
        ["body", "args", "bogus"],
        ["body", "args", "other"],
        ["body", "args", "n"],
        ["body", "args", "r"],
    ]
    assert [e["msg"] for e in exc.value.errors] == [
        "unknown argument",
        "unknown argument",
        "must be at most 1",
        "is required",
    ]
    assert exc.value.message.startswith("invalid args for script 't': bogus: unknown argument;")


def test_thousands_of_unknown_arguments_make_a_short_answer() -> None:
    """A body of 20,000 unknown keys names the first 20 and counts the rest: the answer stays
    small, where it used to list every key twice (about 30 bytes each)."""
    spec = script({"n": {"type": "int"}})
    with pytest.raises(InvalidArgs) as exc:
        spec.validate_args({f"k{i}": 1 for i in range(20_000)})
    assert len(exc.value.errors) == 21
    assert exc.value.errors[-1] == {"loc": ["body", "args"], "msg": "and 19980 more unknown arguments"}
    assert len(exc.value.message) < 2000


@pytest.mark.parametrize("raw", [None, [], "x", 5, [("a", 1)]])
def test_args_must_be_an_object(raw: Any) -> None:
    spec = script({"n": {"type": "int"}})
    with pytest.raises(InvalidArgs) as exc:
        spec.validate_args(raw)
    assert exc.value.errors == [{"loc": ["body", "args"], "msg": "must be an object"}]


def test_no_args_script_refuses_any_argument() -> None:
    spec = script({}, ["true"])
    assert spec.validate_args({}) == {}
    assert errors_of(spec, {"x": 1}) == {"x": "unknown argument"}


def test_arg_to_public_shape() -> None:
    spec = script({"m": {"type": "enum", "choices": ["a", "b"], "default": "a", "description": "d"}})
    assert spec.args["m"].to_public() == {
        "name": "m",
        "type": "enum",
        "required": False,
        "default": "a",
        "min": None,
        "max": None,
        "choices": ["a", "b"],
        "max_length": None,
        "pattern": None,
    }
    assert spec.args["m"] == ArgSpec(name="m", type="enum", default="a", choices=("a", "b"), description="d")


# ------------------------------------------------------------------------------------ config errors

BAD_ARGS: list[tuple[dict[str, Any], str]] = [
    ({"n": {"type": "float"}}, '[scripts."t"].args.n.type: must be one of: int, bool, string, enum'),
    ({"n": {}}, '[scripts."t"].args.n.type: must be one of'),
    ({"n": {"type": "int", "bogus": 1}}, '[scripts."t"].args.n.bogus: unknown key'),
    ({"n": "int"}, '[scripts."t"].args.n: must be a table'),
    ({"n": {"type": "int", "min": 5, "max": 1}}, '[scripts."t"].args.n.max: must be at least min (5)'),
    ({"n": {"type": "int", "min": 1.5}}, '[scripts."t"].args.n.min: must be an integer'),
    ({"n": {"type": "int", "min": True}}, '[scripts."t"].args.n.min: must be an integer'),
    ({"n": {"type": "string", "min": 1}}, '[scripts."t"].args.n.min: only applies to int arguments'),
    (
        {"n": {"type": "int", "pattern": "x"}},
        '[scripts."t"].args.n.pattern: only applies to string arguments',
    ),
    ({"n": {"type": "int", "max_length": 3}}, '[scripts."t"].args.n.max_length: only applies to string'),
    ({"n": {"type": "string", "choices": ["a"]}}, '[scripts."t"].args.n.choices: only applies to enum'),
    ({"n": {"type": "enum"}}, '[scripts."t"].args.n.choices: an enum needs a non-empty list'),
    ({"n": {"type": "enum", "choices": []}}, '[scripts."t"].args.n.choices: an enum needs'),
    ({"n": {"type": "enum", "choices": ["a", "a"]}}, '[scripts."t"].args.n.choices: an enum needs'),
    ({"n": {"type": "enum", "choices": [1]}}, '[scripts."t"].args.n.choices: must be a list of strings'),
    ({"n": {"type": "string", "max_length": 0}}, '[scripts."t"].args.n.max_length: must be at least 1'),
    ({"n": {"type": "string", "pattern": "(["}}, '[scripts."t"].args.n.pattern: is not a valid regular expr'),
    ({"n": {"type": "string", "required": "yes"}}, '[scripts."t"].args.n.required: must be true or false'),
    ({"n": {"type": "int", "required": True, "default": 1}}, ".args.n.default: a required argument cannot"),
    ({"n": {"type": "int", "max": 3, "default": 5}}, '[scripts."t"].args.n.default: must be at most 3 (the'),
    ({"n": {"type": "int", "default": "5"}}, '[scripts."t"].args.n.default: must be an integer'),
    ({"n": {"type": "enum", "choices": ["a"], "default": "b"}}, ".args.n.default: must be one of: a"),
    (
        {"n": {"type": "string", "pattern": "[a-z]+", "default": "A"}},
        ".args.n.default: must match the pattern",
    ),
    ({"n": {"type": "string", "default": "--x"}}, ".args.n.default: must not start with '-'"),
    ({"n": {"type": "bool", "default": "true"}}, ".args.n.default: must be true or false"),
    ({"n": {"type": "string", "description": 5}}, '[scripts."t"].args.n.description: must be a string'),
    ({"n": {"type": "string", "flag": "model"}}, '[scripts."t"].args.n.flag: must look like -x or --name'),
    ({"n": {"type": "string", "flag": "--a b"}}, '[scripts."t"].args.n.flag: must look like'),
    ({"n": {"type": "string", "flag": "--x=1"}}, '[scripts."t"].args.n.flag: must look like'),
    (
        {"workspace": {"type": "string"}},
        "[scripts.\"t\"].args.workspace: 'workspace' is a built-in placeholder",
    ),
    ({"my-arg": {"type": "string"}}, '[scripts."t"].args.my-arg: argument names are letters'),
    ({"1st": {"type": "string"}}, '[scripts."t"].args.1st: argument names are letters'),
]


@pytest.mark.parametrize(("args", "expected"), BAD_ARGS)
def test_arg_config_errors_name_the_toml_path(args: dict[str, Any], expected: str) -> None:
    message = config_error(args)
    assert message.startswith("runner.toml [scripts.")
    assert expected in message


def test_an_argv_value_must_fit_one_command_line_argument() -> None:
    """Linux takes at most 131072 bytes (NUL included) in one argv element: a longer string passed
    validation, was queued, and its job failed at spawn with "Argument list too long"."""
    spec = script({"s": {"type": "string"}, "f": {"type": "string", "flag": "--f"}})
    longest = "é" * 65535 + "x"  # 131071 bytes of UTF-8
    assert spec.validate_args({"s": longest}) == {"s": longest}
    for name in ("s", "f"):
        assert "131072 bytes" in errors_of(spec, {name: longest + "x"})[name]
        assert "131072 bytes" in errors_of(spec, {name: "€" * 43691})[name]  # 131073 bytes, few characters
    # On stdin there is no such limit.
    stdin_only = script({"s": {"type": "string"}}, ["tool"], stdin="{s}")
    assert stdin_only.validate_args({"s": "x" * 200_000}) == {"s": "x" * 200_000}
    # The limit is the kernel's: the longest value runs, one byte more cannot be started.
    done = subprocess.run(["/bin/echo", longest], capture_output=True, timeout=30)
    assert done.returncode == 0 and len(done.stdout) == len(longest.encode()) + 1
    with pytest.raises(OSError):
        subprocess.run(["/bin/echo", longest + "x"], capture_output=True, timeout=30)
