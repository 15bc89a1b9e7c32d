"""prepare_codex_home: what the runner-owned config.toml says, and that an operator's file is never
overwritten. (No codex needed here; test_codex_binary.py runs codex with `--strict-config` on
this config, which proves codex 0.169 accepts every key.)"""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest

from codex_runner.errors import ConfigError
from codex_runner.execution.codex_home import MANAGED_MARKER, PROVIDER_ID, prepare_codex_home, render_config


def load(home: Path) -> dict:
    return tomllib.loads((home / "config.toml").read_text())


def test_default_config_stops_every_outside_call(tmp_path: Path) -> None:
    home = prepare_codex_home(tmp_path / "codex-home")
    config = load(home)
    assert config["analytics"] == {"enabled": False}
    assert config["features"] == {"plugins": False, "remote_plugin": False}
    assert config["check_for_update_on_startup"] is False
    assert config["shell_environment_policy"] == {"ignore_default_excludes": False}
    assert "model_provider" not in config and "model_providers" not in config
    assert (home / "config.toml").read_text().startswith(MANAGED_MARKER + "\n")
    assert stat.S_IMODE((home / "config.toml").stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_custom_provider(tmp_path: Path) -> None:
    home = prepare_codex_home(tmp_path / "h", base_url="http://127.0.0.1:8080/v1/", provider_env_key="MY_KEY")
    config = load(home)
    assert config["model_provider"] == PROVIDER_ID
    assert config["model_providers"][PROVIDER_ID] == {
        "name": PROVIDER_ID,
        "base_url": "http://127.0.0.1:8080/v1",
        "env_key": "MY_KEY",
        "wire_api": "responses",
    }


def test_provider_key_defaults_to_openai_api_key(tmp_path: Path) -> None:
    config = load(prepare_codex_home(tmp_path / "h", base_url="https://llm.internal/v1"))
    assert config["model_providers"][PROVIDER_ID]["env_key"] == "OPENAI_API_KEY"


def test_extra_config_top_level_keys_stay_top_level(tmp_path: Path) -> None:
    extra = (
        'model = "gpt-5.5"\n'
        "model_providers.codex-runner.request_max_retries = 1\n"
        "[sandbox_workspace_write]\nexclude_slash_tmp = true\n"
    )
    config = load(prepare_codex_home(tmp_path / "h", base_url="http://x/v1", extra_config=extra))
    assert config["model"] == "gpt-5.5"
    assert config["sandbox_workspace_write"] == {"exclude_slash_tmp": True}
    provider = config["model_providers"][PROVIDER_ID]
    assert provider["wire_api"] == "responses" and provider["request_max_retries"] == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"extra_config": "[features]\nplugins = true\n"},
        {"extra_config": "this is not toml"},
        {"base_url": "ftp://host/v1"},
        {"base_url": "http://x/v1", "provider_env_key": "BAD KEY"},
    ],
)
def test_bad_settings_are_config_errors(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        prepare_codex_home(tmp_path / "h", **kwargs)
    with pytest.raises(ConfigError):
        render_config(**kwargs)


def test_an_operator_config_is_never_overwritten(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    mine = 'model = "o3"\n'
    (home / "config.toml").write_text(mine)
    assert prepare_codex_home(home, base_url="http://x/v1") == home
    assert (home / "config.toml").read_text() == mine


def test_the_runner_file_is_rewritten(tmp_path: Path) -> None:
    home = prepare_codex_home(tmp_path / "h", base_url="http://old/v1")
    prepare_codex_home(home, base_url="http://new/v1")
    assert load(home)["model_providers"][PROVIDER_ID]["base_url"] == "http://new/v1"
    assert [p.name for p in home.iterdir()] == ["config.toml"]


def test_an_operator_config_that_is_a_symlink_is_never_replaced(tmp_path: Path) -> None:
    """A `config.toml` symlink is the operator's, even while its target is missing (a mount not yet
    there): the runner neither writes through it nor replaces it with its own file."""
    home = tmp_path / "home"
    home.mkdir()
    target = tmp_path / "shared" / "config.toml"
    (home / "config.toml").symlink_to(target)
    prepare_codex_home(home)
    assert (home / "config.toml").is_symlink() and not target.exists()
    target.parent.mkdir()
    target.write_text('model = "operator"\n')
    prepare_codex_home(home)
    assert (home / "config.toml").read_text() == 'model = "operator"\n'
