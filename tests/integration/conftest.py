"""Integration layer: a real server with its launcher on loopback, real processes, real git."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from codex_runner.config import load_settings
from codex_runner.runtime import Runtime
from codex_runner.server import build_app
from codex_runner.store import JobStore, create_store_engine
from codex_runner.store.migrate import upgrade

from tests.helpers import JobPolling, make_git_repo, serve_app

BEHAVE = Path(__file__).parent / "scripts" / "behave.py"

TOML = """
[repos.scratch]
source = "{repo}"
workspace = "scratch"

[repos.inplace]
source = "{repo}"
workspace = "in_place"
commit = false

[scripts.behave]
command = ["{python}", "{behave}"]
timeout_seconds = {timeout}

[scripts.behave.args.exit]
type = "int"
min = 0
max = 255
flag = "--exit"

[scripts.behave.args.sleep]
type = "string"
pattern = "^[0-9.]+$"
flag = "--sleep"

[scripts.behave.args.stderr]
type = "string"
flag = "--stderr"

[scripts.behave.args.stdout]
type = "string"
flag = "--stdout"

[scripts.behave.args.pids]
type = "string"
flag = "--pids"

[scripts.behave.args.grandchild]
type = "bool"
flag = "--grandchild"

[scripts.behave.args.ignore_term]
type = "bool"
flag = "--ignore-term"

[scripts.behave.args.bytes]
type = "int"
min = 0
flag = "--bytes"

[scripts.behave.args.ledger]
type = "string"
flag = "--ledger"

[scripts.behave.args.touch]
type = "string"
flag = "--touch"

[scripts.behave.args.env_dump]
type = "string"
flag = "--env-dump"

[scripts.behave.args.escape]
type = "string"
flag = "--escape"

[scripts.behave.args.escape_bare]
type = "string"
flag = "--escape-bare"

[scripts.behave.args.count_term]
type = "string"
flag = "--count-term"

[scripts.missing]
command = ["/nonexistent/program-xyz"]

[scripts.short]
command = ["{python}", "{behave}"]
timeout_seconds = 1

[scripts.short.args.sleep]
type = "string"
pattern = "^[0-9.]+$"
flag = "--sleep"

[scripts.short.args.pids]
type = "string"
flag = "--pids"
"""


@dataclass
class Runner(JobPolling):
    url: str
    runtime: Runtime
    token: str
    tmp: Path
    tokens: dict[str, str] = field(default_factory=dict)
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )

    def token_for(self, user: str) -> str:
        if user not in self.tokens:
            self.tokens[user], _ = self.runtime.tokens.create(user, "user")
        return self.tokens[user]

    def submit(
        self,
        args: dict[str, Any] | None = None,
        *,
        repo: str = "scratch",
        script: str = "behave",
        user: str | None = None,
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token_for(user)}"} if user else {}
        r = self.client.post(
            "/api/runner/jobs", json={"repo": repo, "script_key": script, "args": args or {}}, headers=headers
        )
        assert r.status_code == 201, r.text
        return dict(r.json())

    def wait_all(self, ids: list[str], timeout: float = 120) -> list[dict[str, Any]]:
        return [self.wait(i, timeout=timeout) for i in ids]


def runner_settings(
    tmp_path: Path, database_url: str, timeout: int = 60, extra_toml: str = "", **env: str
) -> Any:
    repo = tmp_path / "repo"
    if not repo.exists():
        make_git_repo(repo)
    (tmp_path / "runner.toml").write_text(
        textwrap.dedent(TOML.format(repo=repo, python=sys.executable, behave=BEHAVE, timeout=timeout))
        + extra_toml
    )
    base = {
        "RUNNER_DATABASE_URL": database_url,
        "RUNNER_DATA_DIR": str(tmp_path / "data"),
        "RUNNER_ID": "test-runner",
        "RUNNER_KILL_GRACE_SECONDS": "1",
        "RUNNER_HEARTBEAT_SECONDS": "1",
        "RUNNER_STALE_AFTER_SECONDS": "5",
        "RUNNER_MAX_QUEUE_SIZE": "1000",
        "RUNNER_MAX_QUEUED_PER_USER": "500",
    }
    return load_settings({**base, **env}, cwd=tmp_path)


@pytest.fixture
def runner_factory(tmp_path: Path, database_url: str) -> Iterator[Callable[..., Runner]]:
    started: list[tuple[Any, Runner]] = []

    def start(extra_toml: str = "", **env: str) -> Runner:
        runtime = Runtime.open(runner_settings(tmp_path, database_url, extra_toml=extra_toml, **env))
        cm = serve_app(build_app(runtime))
        url = cm.__enter__()
        token, _ = runtime.tokens.create("admin", "admin")
        runner = Runner(url, runtime, token, tmp_path)
        started.append((cm, runner))
        return runner

    yield start
    for cm, runner in started:
        runner.client.close()
        cm.__exit__(None, None, None)
        runner.runtime.close()


@pytest.fixture
def runner(runner_factory: Callable[..., Runner]) -> Runner:
    return runner_factory()


@pytest.fixture
def pg_store(pg_database_url: str) -> Iterator[JobStore]:
    """A migrated store on a scratch PostgreSQL database."""
    engine = create_store_engine(pg_database_url)
    upgrade(engine)
    yield JobStore(engine)
    engine.dispose()


@pytest.fixture
def store(database_url: str) -> Iterator[JobStore]:
    """A migrated store on the test's database (SQLite file or a scratch PostgreSQL database)."""
    engine = create_store_engine(database_url)
    upgrade(engine)
    yield JobStore(engine)
    engine.dispose()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """A folder for the files a test's jobs write. Not `tmp_path` itself: it holds the runner's
    data folder, database and config, so it lies on the way to them, and a job confined by
    Landlock cannot create entries directly in it (docs/execution.md, "Job isolation")."""
    path = tmp_path / "out"
    path.mkdir(exist_ok=True)
    return path
