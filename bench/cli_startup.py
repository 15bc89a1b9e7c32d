"""How long a `codex-runner` client command takes to start, and how much memory it takes.

    .venv/bin/python bench/cli_startup.py [--runs 15] [--json]

Runs the venv's `codex-runner` with `version`, `jobs list --help` and `submit --help` (no server
needed: they parse, build the command tree and print) `--runs` times each, one at a time, and
prints the median and maximum wall time and the median peak RSS (`ru_maxrss` of the child). A CI
job or a chat bot calling the CLI once per job pays this every time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLI = str(Path(sys.executable).parent / "codex-runner")
COMMANDS = (["version"], ["jobs", "list", "--help"], ["submit", "--help"])


def one_run(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one command, by a fork of its own for `wait4`."""
    started = time.perf_counter()
    proc = subprocess.Popen([CLI, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}")
    return time.perf_counter() - started, usage.ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    one_run(["version"])  # warm the page cache and the bytecode
    results = {}
    for argv in COMMANDS:
        runs = [one_run(argv) for _ in range(opts.runs)]
        walls = [w for w, _ in runs]
        results[" ".join(argv)] = {
            "median_ms": round(statistics.median(walls) * 1000, 1),
            "max_ms": round(max(walls) * 1000, 1),
            "rss_mib": round(statistics.median(r for _, r in runs) / 1024, 1),
        }
    load = os.getloadavg()[0]
    if opts.json:
        print(json.dumps({"commands": results, "load_average": load}))
        return
    print(f"codex-runner start-up, {opts.runs} runs each (load average {load:.2f})")
    for name, r in results.items():
        print(
            f"  {name:<20} median {r['median_ms']:7.1f} ms  max {r['max_ms']:7.1f} ms  RSS {r['rss_mib']:5.1f} MiB"
        )


if __name__ == "__main__":
    main()
