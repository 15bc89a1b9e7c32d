"""`serve` and `worker` start-up (`on_startup`) rewrite the runner's managed codex config.toml, as
its header says: a file an earlier version wrote gets this version's settings. An operator's
file (no managed first line), a symlink and a CODEX_HOME passed through are never touched."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from codex_runner.catalog import Catalog
from codex_runner.config import load_settings
from codex_runner.execution.agents import codex_home_for
from codex_runner.execution.codex_home import MANAGED_MARKER, render_config
from codex_runner.ops.service import on_startup
from codex_runner.runtime import Runtime

# What an earlier version may have written: its marker, and settings this version changed.
OLD_MANAGED = (
    f"{MANAGED_MARKER}\n# Rewritten by codex-runner at start-up.\n"
    "check_for_update_on_startup = true\nfeatures.plugins = true\n"
)
OPERATOR = '# my own codex config\nmodel = "o3"\nfeatures.plugins = true\n'

Start = Callable[..., Runtime]


@pytest.fixture
def start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Start]:
    """`on_startup` of a runtime on SQLite in tmp_path (no start-up checks: not what is tested)."""
    monkeypatch.delenv("CODEX_HOME", raising=False)
    opened: list[Runtime] = []

    def run(builtins: bool = True, **env: str) -> Runtime:
        settings = load_settings(
            {
                "RUNNER_DATA_DIR": str(tmp_path / "data"),
                "RUNNER_DATABASE_URL": f"sqlite:///{tmp_path / 'runner.db'}",
                **env,
            },
            cwd=tmp_path,
        )
        rt = Runtime.open(settings, catalog=Catalog.from_settings(settings, builtins=builtins))
        opened.append(rt)
        on_startup(rt, checks=False)
        return rt

    yield run
    for rt in opened:
        rt.close()


def test_an_old_managed_config_is_rewritten_at_startup(tmp_path: Path, start: Start) -> None:
    home = tmp_path / "data" / "codex-home"
    home.mkdir(parents=True, mode=0o700)
    config = home / "config.toml"
    config.write_text(OLD_MANAGED)
    config.chmod(0o644)
    rt = start()
    assert codex_home_for(rt.settings) == home  # what jobs then get, as it is
    assert config.read_text() == render_config()
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert [p.name for p in home.iterdir()] == ["config.toml"]  # no temp file left behind


def test_the_runner_codex_home_is_made_at_startup(tmp_path: Path, start: Start) -> None:
    start()
    home = tmp_path / "data" / "codex-home"
    assert (home / "config.toml").read_text() == render_config()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_an_operator_config_is_not_touched_at_startup(tmp_path: Path, start: Start) -> None:
    home = tmp_path / "operator-home"
    home.mkdir()
    config = home / "config.toml"
    config.write_text(OPERATOR)
    os.utime(config, ns=(1_000_000_000, 1_000_000_000))
    linked = tmp_path / "linked-home"
    linked.mkdir()
    (linked / "config.toml").symlink_to(tmp_path / "shared" / "config.toml")  # dangling
    start(RUNNER_CODEX_HOME=str(home))
    assert config.read_text() == OPERATOR and config.stat().st_mtime_ns == 1_000_000_000
    assert [p.name for p in home.iterdir()] == ["config.toml"]
    start(RUNNER_CODEX_HOME=str(linked))
    assert (linked / "config.toml").is_symlink() and not (tmp_path / "shared").exists()


def test_nothing_is_written_without_a_runner_codex_home_to_keep(
    tmp_path: Path, start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No script runs codex.
    start(builtins=False)
    assert not (tmp_path / "data" / "codex-home").exists()
    # A CODEX_HOME passed through from the runner's environment is its owner's.
    theirs = tmp_path / "their-home"
    theirs.mkdir()
    (theirs / "config.toml").write_text(OLD_MANAGED)
    monkeypatch.setenv("CODEX_HOME", str(theirs))
    start()
    assert (theirs / "config.toml").read_text() == OLD_MANAGED
    assert not (tmp_path / "data" / "codex-home").exists()


def test_a_codex_home_that_cannot_be_made_does_not_stop_the_start(
    tmp_path: Path, start: Start, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only codex jobs need it, and they fail with their own error; the service log says why."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    start(RUNNER_CODEX_HOME=str(blocker / "codex-home"))
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    warned = [line for line in lines if line["event"] == "codex_home_not_prepared"]
    assert len(warned) == 1 and warned[0]["level"] == "warning" and "Not a directory" in warned[0]["error"]
