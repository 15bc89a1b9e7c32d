"""One codex version: `CODEX_VERSION` in Python is what the Makefile installs (`make codex`) and
what docs/codex.md names, so that doctor's `codex_version` check warns against the right one."""

from __future__ import annotations

import re
from pathlib import Path

from codex_runner.execution.codex_version import CODEX_VERSION

ROOT = Path(__file__).resolve().parents[2]


def test_the_makefile_installs_the_pinned_version() -> None:
    pinned = re.findall(r"^CODEX_VERSION\s*:?=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert pinned == [CODEX_VERSION]


def test_the_codex_page_names_the_pinned_version() -> None:
    page = (ROOT / "docs" / "codex.md").read_text()
    assert f"pinned at **{CODEX_VERSION}**" in page
    assert f"install-codex.sh {CODEX_VERSION} ~/.cache/codex-runner/codex-{CODEX_VERSION}" in page
