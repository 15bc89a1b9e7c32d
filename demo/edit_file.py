#!/usr/bin/env python3
"""The demo script of `make run`: edits a file in the job's workspace (its working directory) and
prints progress as it goes, so a demo job has a log to follow and a change for the runner to commit.

Standard library only: it runs under the runner's minimal environment.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--message", default="hello from codex-runner", help="text to write")
    parser.add_argument("--steps", type=int, default=3, help="lines to write, one per step")
    parser.add_argument("--delay", type=float, default=0.5, help="seconds to pause per step")
    parser.add_argument("--file", default="NOTES.md", help="file to edit, relative to the workspace")
    args = parser.parse_args(argv)

    workspace = Path.cwd().resolve()
    target = (workspace / args.file).resolve()
    if not target.is_relative_to(workspace):
        print(f"refusing to write outside the workspace: {args.file}", file=sys.stderr)
        return 2
    # flush=True throughout: stdout is a pipe to the runner, and the log should grow step by step.
    print(f"editing {args.file} in {workspace}", flush=True)
    lines = []
    for step in range(1, args.steps + 1):
        print(f"step {step}/{args.steps}: {args.message}", flush=True)
        lines.append(f"- step {step}: {args.message}")
        time.sleep(args.delay)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    with target.open("a", encoding="utf-8") as fh:
        fh.write(f"\n## {stamp}\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} line(s) to {args.file}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
