"""The codex CLI version this runner is built and tested for, and the installed one's.

`CODEX_VERSION` is the one source of truth: the Makefile's `CODEX_VERSION` (what `make codex`
installs) and docs/codex.md must agree with it (tests/unit/test_codex_version.py). The runner
depends on that version's flags, its JSON events and the config.toml keys it writes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from codex_runner.execution.process import build_env

CODEX_VERSION = "0.169.0"
VERSION_TIMEOUT_SECONDS = 10.0

# `codex --version` prints `codex-cli 0.169.0`.
_VERSION = re.compile(r"\b(\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?)\b")
# Versions already read, by the binary's identity (a reinstall changes it): the checks may run
# many times in one process (tests, in-process CLI calls), and each `codex --version` costs a node
# start (~0.3 s).
_seen: dict[tuple[str, int, int, int], str] = {}


class VersionUnreadable(Exception):
    """`codex --version` did not run or said no version; the message says why in a few words."""


def resolve(program: str) -> str | None:
    """Where a job's spawn finds `program` (execution/process.py): a path as it is, a bare name on
    the PATH jobs get (the runner's own). None when there is nothing to run there."""
    if "/" in program:
        return program if Path(program).is_file() and os.access(program, os.X_OK) else None
    return shutil.which(program, path=build_env((), {}).get("PATH", os.defpath))


def installed_version(codex: str, *, timeout: float | None = None) -> str:
    """The version `codex --version` prints (within `timeout`, default `VERSION_TIMEOUT_SECONDS`).
    Raises `VersionUnreadable`."""
    try:
        real = os.path.realpath(codex)
        st = os.stat(real)
    except OSError as exc:
        raise VersionUnreadable(exc.strerror or str(exc)) from None
    key = (real, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _seen:
        _seen[key] = _run_version(codex, VERSION_TIMEOUT_SECONDS if timeout is None else timeout)
    return _seen[key]


def _run_version(codex: str, timeout: float) -> str:
    # The minimal environment (no API key: a version needs none) and a CODEX_HOME of its own,
    # removed after: even `--version` writes helper links into CODEX_HOME (or ~/.codex).
    with tempfile.TemporaryDirectory(prefix="codex-version-") as home:
        env = build_env((), {"CODEX_HOME": home})
        try:
            # Its own session, so that a timeout kills the node launcher's child (the native
            # binary) too.
            with subprocess.Popen(
                [codex, "--version"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
                text=True,
                errors="replace",
            ) as proc:
                try:
                    out, err = proc.communicate(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise VersionUnreadable(
                        f"`codex --version` did not answer within {timeout:g} s"
                    ) from None
        except OSError as exc:
            raise VersionUnreadable(exc.strerror or str(exc)) from None
    if proc.returncode != 0:
        said = next((line.strip() for line in (err + out).splitlines() if line.strip()), "")
        raise VersionUnreadable(
            f"`codex --version` exited with {proc.returncode}" + (f": {said[:120]}" if said else "")
        )
    found = _VERSION.search(out)
    if found is None:
        raise VersionUnreadable(f"`codex --version` printed no version ({out.strip()[:80]!r})")
    return found[1]
