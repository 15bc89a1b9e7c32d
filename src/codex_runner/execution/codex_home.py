"""The runner-owned CODEX_HOME: a `config.toml` that keeps codex from talking to anything but its model.

Ownership rule: the runner writes `config.toml` only when the file is absent or still starts with
`MANAGED_MARKER`; then it rewrites it on every call, so the settings follow the runner's version
(`serve` and `worker` call it at start-up: execution/agents.py `refresh_codex_home`).
A `config.toml` without the marker belongs to the operator and is never touched (to take the
runner's file over, delete its first line). docs/codex.md explains each setting.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import tomllib
from pathlib import Path

from codex_runner.errors import ConfigError

CONFIG_NAME = "config.toml"
MANAGED_MARKER = "# codex-runner: managed file"
PROVIDER_ID = "codex-runner"
DEFAULT_PROVIDER_ENV_KEY = "OPENAI_API_KEY"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Top-level dotted keys rather than [tables], so that `extra_config`, appended last, may still add
# top-level keys; a TOML table header would capture everything that follows it.
_BASE_SETTINGS = """\
# Rewritten by codex-runner at start-up. Delete the first line to own this file yourself:
# the runner then leaves it alone.

# The runner pins its codex version; codex must not go looking for a newer one.
check_for_update_on_startup = false
# Without these, codex 0.169 resolves ab.chatgpt.com (analytics) and api.github.com and
# chatgpt.com (plugins) on every run.
analytics.enabled = false
features.plugins = false
features.remote_plugin = false
# codex passes its whole environment to the commands the model runs; the default excludes drop
# every variable whose name contains KEY, SECRET or TOKEN (OPENAI_API_KEY among them).
shell_environment_policy.ignore_default_excludes = false
"""


def _toml_string(value: str) -> str:
    # A JSON string (ASCII only, \\uXXXX escapes) is also a valid TOML basic string.
    return json.dumps(value, ensure_ascii=True)


def render_config(
    *, base_url: str | None = None, provider_env_key: str | None = None, extra_config: str | None = None
) -> str:
    """The text of a runner-managed config.toml. Raises ConfigError if the result is not valid TOML."""
    parts = [MANAGED_MARKER + "\n", _BASE_SETTINGS]
    if base_url is not None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"codex provider base_url must be an http(s) URL, got {base_url!r}")
        env_key = provider_env_key or DEFAULT_PROVIDER_ENV_KEY
        if not _ENV_NAME.match(env_key):
            raise ConfigError(f"codex provider env_key must be an environment variable name, got {env_key!r}")
        table = f"model_providers.{PROVIDER_ID}"
        # Only the Responses wire API exists in codex 0.169; requests go to <base_url>/responses.
        # Dotted keys again, so that extra_config may add provider keys such as request_max_retries.
        parts.append(
            f"\nmodel_provider = {_toml_string(PROVIDER_ID)}\n"
            f"{table}.name = {_toml_string(PROVIDER_ID)}\n"
            f"{table}.base_url = {_toml_string(base_url.rstrip('/'))}\n"
            f"{table}.env_key = {_toml_string(env_key)}\n"
            f'{table}.wire_api = "responses"\n'
        )
    if extra_config:
        parts.append("\n" + extra_config.rstrip("\n") + "\n")
    text = "".join(parts)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"codex config.toml would be invalid (check extra_config): {exc}") from exc
    return text


def is_runner_managed(config_path: Path) -> bool:
    """True when the runner may write `config_path`: absent, or a file it wrote (its marker line).
    A symlink, even a dangling one, is the operator's."""
    if config_path.is_symlink():
        return False
    try:
        with config_path.open("r", encoding="utf-8", errors="replace") as handle:
            return handle.readline().rstrip("\r\n") == MANAGED_MARKER
    except FileNotFoundError:
        return True


def prepare_codex_home(
    path: Path,
    *,
    base_url: str | None = None,
    provider_env_key: str | None = None,
    extra_config: str | None = None,
) -> Path:
    """Create `path` as a CODEX_HOME and write its config.toml (unless the operator owns it).

    With `base_url`, a provider `codex-runner` becomes the default model provider: it speaks the
    Responses API at `<base_url>/responses` and reads its API key from `provider_env_key`
    (default OPENAI_API_KEY). `extra_config` is TOML appended verbatim; it may add keys to that
    provider as `model_providers.codex-runner.<key> = ...`. Returns `path`.
    """
    text = render_config(base_url=base_url, provider_env_key=provider_env_key, extra_config=extra_config)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    config_path = path / CONFIG_NAME
    if not is_runner_managed(config_path):
        return path
    # Write-then-rename: several runner instances may prepare the same home at once, and codex
    # must never read a half-written file.
    fd, tmp_name = tempfile.mkstemp(prefix=".config.", suffix=".toml", dir=path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp_name, 0o600)
        os.replace(tmp_name, config_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
