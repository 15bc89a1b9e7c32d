"""Chaos layer: real `codex-runner serve`/`worker` processes SIGKILLed, frozen and restarted on
SQLite and PostgreSQL (docs/crash-safety.md).

Tests marked `disruptive` restart the shared PostgreSQL server, which breaks whatever else runs
against it; they are deselected unless the `-m` expression names them, and are meant to run on
their own: `pytest -m disruptive -p no:xdist`."""

from __future__ import annotations

import pytest

DISRUPTIVE_HELP = (
    "disruptive: restarts shared services (PostgreSQL); run alone with -m disruptive -p no:xdist"
)


def pytest_configure(config: pytest.Config) -> None:
    # Registered here as well as in pyproject.toml so that --strict-markers holds either way.
    config.addinivalue_line("markers", DISRUPTIVE_HELP)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "disruptive" in (config.option.markexpr or ""):
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("disruptive") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
