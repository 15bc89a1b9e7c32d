"""A test script with many behaviours, chosen by flags. Used by the launcher tests."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--exit", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--stderr", default="")
    p.add_argument("--stdout", default="")
    p.add_argument("--pids", default="")
    p.add_argument("--grandchild", action="store_true", help="start a child that ignores SIGTERM")
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--bytes", type=int, default=0, help="write this many bytes to stdout")
    p.add_argument("--ledger", default="")
    p.add_argument("--touch", default="")
    p.add_argument("--files", type=int, default=0, help="write this many new files into gen/")
    p.add_argument("--env-dump", default="")
    p.add_argument("--escape", default="", help="start a daemon out of the job's group; its pid here")
    p.add_argument(
        "--escape-bare",
        default="",
        help="the same, with an empty environment (no RUNNER_JOB_ID) and the workspace in its arguments",
    )
    p.add_argument("--count-term", default="", help="add a line to this file at each SIGTERM, and live on")
    a = p.parse_args()
    if a.ledger:
        with open(a.ledger, "a") as fh:
            fh.write(os.environ.get("RUNNER_JOB_ID", "?") + "\n")
    if a.env_dump:
        Path(a.env_dump).write_text("\n".join(sorted(f"{k}={v}" for k, v in os.environ.items())))
    if a.ignore_term:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if a.count_term:
        import signal

        def counted(_signum: int, _frame: object) -> None:
            with open(a.count_term, "a") as fh:
                fh.write("term\n")

        signal.signal(signal.SIGTERM, counted)
    pids = [os.getpid()]
    if a.grandchild:
        child = subprocess.Popen(["sh", "-c", "trap '' TERM; while true; do sleep 1; done"])
        pids.append(child.pid)
    if a.pids:
        Path(a.pids).write_text(" ".join(map(str, pids)))
    if a.escape:
        # A daemon: a session of its own (out of the job's process group), no pipe of the job's,
        # and a child of its own in its group.
        daemon = subprocess.Popen(
            ["sh", "-c", 'sleep 1000 & echo $! > "$1.child"; exec sleep 1000', "sh", a.escape],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        Path(a.escape).write_text(str(daemon.pid))
    if a.escape_bare:
        # As codex's sandbox helper (bubblewrap): a session of its own, nothing of the job's
        # environment, the workspace among its arguments.
        daemon = subprocess.Popen(
            ["/bin/sh", "-c", 'sleep 1000 & echo $! > "$1.child"; wait', "sh", a.escape_bare, os.getcwd()],
            start_new_session=True,
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        Path(a.escape_bare).write_text(str(daemon.pid))
    if a.stdout:
        print(a.stdout, flush=True)
    if a.stderr:
        print(a.stderr, file=sys.stderr, flush=True)
    if a.touch:
        Path(a.touch).write_text("changed by the job\n")
    if a.files:
        Path("gen").mkdir(exist_ok=True)
        for i in range(a.files):
            Path(f"gen/{i}.txt").write_text(f"file {i}: {os.urandom(512).hex()}\n")
    if a.bytes:
        block = (b"x" * 1023 + b"\n") * 64
        left = a.bytes
        out = sys.stdout.buffer
        while left > 0:
            chunk = block[: min(len(block), left)]
            out.write(chunk)
            left -= len(chunk)
        out.flush()
    if a.sleep:
        time.sleep(a.sleep)
    return a.exit


if __name__ == "__main__":
    sys.exit(main())
