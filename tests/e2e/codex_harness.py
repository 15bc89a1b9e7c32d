"""Runs the real `codex` binary directly (no runner in between) with a minimal environment, a
timeout on every wait, and a kill of its whole process group when time runs out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from codex_runner.execution.codex_events import CodexEventParser
from codex_runner.execution.codex_version import CODEX_VERSION

CACHE_BIN = Path.home() / ".cache" / "codex-runner" / f"codex-{CODEX_VERSION}" / "bin" / "codex"
# A slug from codex's bundled model catalog: an unknown slug makes codex fall back to defaults
# that drop tools.
MODEL = "gpt-5.5"
FAKE_KEY_VAR = "CODEX_RUNNER_FAKE_KEY"
FAKE_KEY = "sk-fake-codex-runner-test-key"
# Keep failure tests short: codex retries a failed request 4 times and a broken stream 5 times
# by default, which takes ~25 s against an HTTP 500.
FAST_RETRIES = (
    "model_providers.codex-runner.request_max_retries = 1\n"
    "model_providers.codex-runner.stream_max_retries = 1\n"
)
STDERR_LIMIT = 64 * 1024


def find_codex() -> tuple[str | None, str]:
    """(path, reason): the pinned codex from the install cache, else from PATH, if its version matches."""
    candidates = [str(CACHE_BIN)] if CACHE_BIN.exists() else []
    on_path = shutil.which("codex")
    if on_path:
        candidates.append(on_path)
    if not candidates:
        return None, f"codex not found on PATH nor at {CACHE_BIN} (run `make codex`)"
    for candidate in candidates:
        try:
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        if CODEX_VERSION in out:
            return candidate, ""
    return None, f"no codex {CODEX_VERSION} among {candidates} (run `make codex`)"


def minimal_env(codex_home: Path, home: Path) -> dict[str, str]:
    """Only what codex needs: nothing of the runner's own environment leaks through."""
    node = shutil.which("node")
    # The npm launcher is a node script; the native binary it starts needs nothing more.
    path_dirs = [str(Path(node).parent)] if node else []
    path_dirs += ["/usr/local/bin", "/usr/bin", "/bin"]
    return {
        "PATH": os.pathsep.join(dict.fromkeys(path_dirs)),
        "HOME": str(home),
        "CODEX_HOME": str(codex_home),
        "LANG": "C.UTF-8",
        FAKE_KEY_VAR: FAKE_KEY,
    }


def codex_argv(codex: str, workspace: Path, *extra: str) -> list[str]:
    return [
        codex,
        "exec",
        "--json",
        "--sandbox",
        "workspace-write",
        "--color",
        "never",
        "--strict-config",
        "-C",
        str(workspace),
        "-m",
        MODEL,
        *extra,
        "-",
    ]


@dataclass
class CodexRun:
    returncode: int | None
    timed_out: bool
    stdout: bytes
    stderr: bytes
    parser: CodexEventParser
    pgid: int
    # Members of codex's process group still alive when codex itself exited on its own.
    leftovers: list[int]


async def _pump(stream: asyncio.StreamReader, sink: bytearray, parser: CodexEventParser | None) -> None:
    while chunk := await stream.read(65536):
        if parser is not None:
            parser.feed(chunk)
        if parser is not None or len(sink) < STDERR_LIMIT:
            sink += chunk
    if parser is not None:
        parser.close()


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


async def run_codex(
    argv: list[str], env: dict[str, str], prompt: str, *, timeout: float, grace: float = 3.0
) -> CodexRun:
    """Run codex with `prompt` on stdin (then closed: codex waits for end of input), feed its
    stdout to a CodexEventParser live, and kill its process group after `timeout` seconds."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    pgid = proc.pid
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(prompt.encode())
    await proc.stdin.drain()
    proc.stdin.close()
    parser = CodexEventParser()
    stdout, stderr = bytearray(), bytearray()
    pumps = asyncio.gather(_pump(proc.stdout, stdout, parser), _pump(proc.stderr, stderr, None))
    timed_out = False
    leftovers: list[int] = []
    try:
        await asyncio.wait_for(proc.wait(), timeout)
        leftovers = group_members(pgid)
    except TimeoutError:
        timed_out = True
        _kill_group(pgid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            _kill_group(pgid, signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), grace)
    # The leader is gone; anything it left in its group goes too, so pipes reach end of file.
    _kill_group(pgid, signal.SIGKILL)
    try:
        await asyncio.wait_for(pumps, grace)
    except TimeoutError:
        pumps.cancel()
    return CodexRun(proc.returncode, timed_out, bytes(stdout), bytes(stderr), parser, pgid, leftovers)


def _live_procs() -> list[tuple[int, list[str], Path]]:
    """(pid, fields of /proc/<pid>/stat after the command name, /proc/<pid>) of live processes."""
    procs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            procs.append((int(entry.name), fields, entry))
    return procs


def group_members(pgid: int) -> list[int]:
    """Live pids in process group `pgid`."""
    return [pid for pid, fields, _ in _live_procs() if int(fields[2]) == pgid]


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of live processes whose environment holds name=value (Linux /proc)."""
    needle = f"{name}={value}".encode()
    found = []
    for pid, _, entry in _live_procs():
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(pid)
    return found
