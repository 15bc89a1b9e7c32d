"""API layer: a real server on loopback over SQLite and PostgreSQL, with tokens for an admin and
two users."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from codex_runner.api import create_app
from codex_runner.config import load_settings
from codex_runner.runtime import Runtime

from tests.helpers import serve_app

RUNNER_TOML = """
[repos.demo]
source = "{repo}"
branch = "main"

[repos.other]
source = "{repo}"
branch = "main"

[repos.off]
source = "{repo}"
enabled = false

[repos.outside]
source = "/opt/not-allowed/repo"

[scripts.echo]
label = "Echo"
command = ["/bin/echo", "{{message}}"]
timeout_seconds = 60

[scripts.echo.args.message]
type = "string"
required = true
max_length = 100

[scripts.echo.args.count]
type = "int"
min = 1
max = 10
default = 1
flag = "--count"

[scripts.echo.args.loud]
type = "bool"
default = false
flag = "--loud"

[scripts.echo.args.mode]
type = "enum"
choices = ["fast", "slow"]
default = "fast"
flag = "--mode"

[scripts.only_demo]
command = ["/bin/true"]
repos = ["demo"]
"""


@dataclass
class Api:
    url: str
    runtime: Runtime
    admin: str
    alice: str
    bob: str
    clients: list[httpx.Client] = field(default_factory=list)
    app: Any = None

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        c = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        self.clients.append(c)
        return c

    def create(self, token: str, body: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
        body = body or {"repo": "demo", "script_key": "echo", "args": {"message": "hi"}}
        return self.client(token).post("/api/runner/jobs", json=body, headers=headers)


def build_runtime(tmp_path: Path, database_url: str, **env: str) -> Runtime:
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    (tmp_path / "runner.toml").write_text(textwrap.dedent(RUNNER_TOML.format(repo=repo)))
    base = {
        "RUNNER_DATABASE_URL": database_url,
        "RUNNER_DATA_DIR": str(tmp_path / "data"),
        "RUNNER_ENABLED": "false",
        "RUNNER_ALLOWED_REPO_PATHS": str(tmp_path),
        "RUNNER_ID": "test-api",
    }
    settings = load_settings({**base, **env}, cwd=tmp_path)
    return Runtime.open(settings)


@pytest.fixture
def api_factory(tmp_path: Path, database_url: str) -> Iterator[Any]:
    started: list[tuple[Any, Api]] = []

    def start(**env: str) -> Api:
        runtime = build_runtime(tmp_path, database_url, **env)
        app = create_app(runtime)
        cm = serve_app(app)
        url = cm.__enter__()
        admin, _ = runtime.tokens.create("root", "admin")
        alice, _ = runtime.tokens.create("alice", "user")
        bob, _ = runtime.tokens.create("bob", "user")
        api = Api(url, runtime, admin, alice, bob, app=app)
        started.append((cm, api))
        return api

    yield start
    for cm, api in started:
        for c in api.clients:
            c.close()
        cm.__exit__(None, None, None)
        api.runtime.close()


@pytest.fixture
def api(api_factory: Any) -> Api:
    return api_factory()
