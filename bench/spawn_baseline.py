"""The raw spawn rate: the ceiling for `bench/dispatch.py`'s drain throughput.

    .venv/bin/python bench/spawn_baseline.py [--jobs 2000] [--concurrency 2 8] [--program /bin/true]

Spawns `--program` `--jobs` times straight from Python, `--concurrency` at a time, the way the
runner does it minus the runner: each process in a session of its own (`start_new_session`), in an
empty per-job folder under a temp dir, stdin from /dev/null, stdout and stderr to a pipe read to EOF,
a minimal environment, `close_fds`. Two drivers:

- "threads": `--concurrency` threads, each `subprocess.Popen` + `communicate` in a loop (the
  figure the issue quotes: about 1,950/s with 2 threads);
- "asyncio": one event loop, `--concurrency` tasks, `asyncio.create_subprocess_exec` + `wait`
  (the runner's own spawn path, without its bookkeeping).

Prints processes/s per driver and concurrency, and the CPU each process cost: in this process
(the spawn, the pipes, the wait) and in the spawned program itself (its own start-up and exit,
from `getrusage(RUSAGE_CHILDREN)`). The second is part of any drain's bill too: the runner's
server CPU per job does not include it, but the children share the same cores. `--json` prints the
rates as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp", "LANG": "C.UTF-8"}


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's reaped children so far: what the spawned
    programs themselves cost, which a drain's server CPU does not include."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _folders(root: Path, jobs: int) -> list[Path]:
    paths = [root / f"job-{i:05d}" for i in range(jobs)]
    for p in paths:
        p.mkdir()
    return paths


def run_threads(program: str, jobs: int, concurrency: int, root: Path) -> float:
    folders = _folders(root, jobs)
    lock = threading.Lock()
    it = iter(folders)

    def worker() -> None:
        while True:
            with lock:
                cwd = next(it, None)
            if cwd is None:
                return
            proc = subprocess.Popen(
                [program],
                cwd=cwd,
                env=ENV,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
            )
            proc.communicate()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return jobs / (time.perf_counter() - start)


def run_asyncio(program: str, jobs: int, concurrency: int, root: Path) -> float:
    folders = _folders(root, jobs)

    async def main() -> float:
        it = iter(folders)

        async def worker() -> None:
            for cwd in it:
                proc = await asyncio.create_subprocess_exec(
                    program,
                    cwd=cwd,
                    env=ENV,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                    close_fds=True,
                )
                await proc.communicate()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return jobs / (time.perf_counter() - start)

    return asyncio.run(main())


@dataclass
class Spawned:
    rate: float  # processes/s
    parent_ms: float  # this process's CPU per process (every thread)
    program_ms: float  # the spawned program's own CPU per process


def measure(program: str, jobs: int, concurrencies: list[int]) -> dict[str, dict[int, Spawned]]:
    out: dict[str, dict[int, Spawned]] = {"threads": {}, "asyncio": {}}
    for c in concurrencies:
        for name, fn in (("threads", run_threads), ("asyncio", run_asyncio)):
            root = Path(tempfile.mkdtemp(prefix="cr-spawn-"))
            try:
                cpu0, children0 = time.process_time(), children_cpu()
                rate = fn(program, jobs, c, root)
                cpu, children = time.process_time() - cpu0, children_cpu() - children0
                out[name][c] = Spawned(rate, cpu / jobs * 1000, children / jobs * 1000)
            finally:
                shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--program", default="/bin/true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = measure(args.program, args.jobs, args.concurrency)
    if args.json:
        print(json.dumps({k: {str(c): round(v.rate, 1) for c, v in d.items()} for k, d in result.items()}))
        return
    print(f"spawn baseline: {args.jobs} x {args.program}, load average {os.getloadavg()[0]:.1f}")
    print("| driver | " + " | ".join(f"c={c}" for c in args.concurrency) + " |")
    print("|---|" + "---|" * len(args.concurrency))
    for name, d in result.items():
        print(f"| {name} | " + " | ".join(f"{d[c].rate:,.0f}/s" for c in args.concurrency) + " |")
    print()
    for name, d in result.items():
        for c in args.concurrency:
            print(
                f"{name}, c={c}: CPU per process {d[c].parent_ms:.2f} ms in this process, "
                f"{d[c].program_ms:.2f} ms in {args.program} itself"
            )


if __name__ == "__main__":
    main()
