"""How long preparing a job's workspace takes on a big repo: a plain full `git clone` per job against
the runner's mirror-based `clone` mode, `worktree` of the mirror, and `worktree` and `clone` (a
hard-linked copy) of a local repo.

    .venv/bin/python bench/workspace.py [--files 20000] [--commits 5] [--rounds 3] [--dir /dev/shm]

A repository of `--files` small text files (in a few hundred folders, with some history) is generated
with `git fast-import` and served by the loopback HTTP git server of the integration tests (Basic
auth, `git http-backend`). For each way, "first" is the first job on a fresh runner data folder
(mirror creation included) and "second" the next job. The runner's ways run twice: with a warm spare
(`RUNNER_WARM_WORKSPACES=1`, the default: the second job starts after the spare the first job's
prepare asked for is ready, as it is when a job runs longer than the spare takes to make — the
"spare" column says how long that took, in the background) and without (`=0`). Between the two
jobs a new commit lands on the base branch, so the second job's base differs from the spare's.
Figures are medians over `--rounds`. Prints a table; not a pass/fail test.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from git_http_server import make_bare_repo, serve_git_http

from codex_runner.config import Settings
from codex_runner.execution.git import GitCredential, run_git
from codex_runner.execution.spares import wait_for_refills
from codex_runner.execution.workspace import cleanup_workspace, prepare_workspace

USER, TOKEN = "bench", "bench-token-0123456789"


@dataclass(frozen=True)
class Repo:
    id: str
    source: str
    source_type: str
    branch: str | None
    workspace: str
    push: bool = False


def generate(bare: Path, files: int, commits: int, seed: int = 7) -> int:
    """Writes `files` files (about 600 bytes each, 100 per folder) and `commits` commits of history
    that each touch 2% of them, straight into `bare` with fast-import. Returns the pack size."""
    rng = random.Random(seed)
    words = [f"{rng.getrandbits(40):x}" for _ in range(5000)]

    def text() -> bytes:
        lines = (" ".join(rng.choices(words, k=8)) for _ in range(rng.randint(4, 12)))
        return ("\n".join(lines) + "\n").encode()

    names = [f"pkg{i // 100:03d}/mod{i % 100:03d}.py" for i in range(files)]
    stream: list[bytes] = []
    for c in range(commits):
        touched = names if c == 0 else rng.sample(names, max(1, files // 50))
        stream.append(b"commit refs/heads/main\n")
        stream.append(f"committer Bench <b@x> {1_700_000_000 + c * 60} +0000\n".encode())
        message = f"commit {c}".encode()
        stream.append(b"data %d\n%s\n" % (len(message), message))
        for name in touched:
            body = text()
            stream.append(b"M 100644 inline %s\ndata %d\n%s\n" % (name.encode(), len(body), body))
        stream.append(b"\n")
    subprocess.run(
        ["git", "--git-dir", str(bare), "fast-import", "--quiet"], input=b"".join(stream), check=True
    )
    subprocess.run(["git", "--git-dir", str(bare), "repack", "-adq"], check=True)
    return sum(p.stat().st_size for p in (bare / "objects" / "pack").glob("*.pack"))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plain_clone(url: str, dest: Path, home: Path, cred: GitCredential) -> None:
    # The same fixed environment and credential helper as the runner, so only the strategy differs.
    run_git(["clone", "-q", "--", url, str(dest)], home=home, credential=cred, plain_http=True)


def push_a_commit(local: Path, bare: Path, n: int) -> None:
    """New upstream work between the two jobs: one file in every folder (1% of 20,000) changes."""
    for path in sorted(local.glob("pkg*/mod000.py")):
        path.write_text(path.read_text() + f"# change {n}\n")
    env = ["-c", "user.name=b", "-c", "user.email=b@b"]
    subprocess.run(["git", *env, "commit", "-qam", f"change {n}"], cwd=local, check=True)
    subprocess.run(["git", "push", "-q", str(bare), "HEAD:main"], cwd=local, check=True)
    # A hosting server keeps its repos packed; left alone, one more pack per push makes every later
    # clone and fetch slower, and the last rounds would measure a different server than the first.
    subprocess.run(["git", "--git-dir", str(bare), "repack", "-adq"], check=True)


def run_way(
    way: str, url: str, local: Path, bare: Path, work: Path, cred: GitCredential, warm: int
) -> tuple[float, float, float]:
    """(first job, spare made in the background, second job), seconds."""
    data = work / f"data-{way}"
    settings = Settings(data_dir=data, workspace_dir=data / "workspaces", warm_workspaces=warm)
    spare = 0.0
    if way == "plain git clone":
        home = work / "home"
        home.mkdir(exist_ok=True)
        first = timed(lambda: plain_clone(url, data / "job1", home, cred))
        push_a_commit(local, bare, 0)
        second = timed(lambda: plain_clone(url, data / "job2", home, cred))
    else:
        mode, source_type, source = {
            "clone (mirror)": ("clone", "git_url", url),
            "worktree (mirror)": ("worktree", "git_url", url),
            "worktree (local repo)": ("worktree", "local_path", str(local)),
            "clone (local repo)": ("clone", "local_path", str(local)),
        }[way]
        repo = Repo("bench", source, source_type, "main", mode)
        spaces = []

        def job(job_id: str) -> None:
            spaces.append(prepare_workspace(repo, job_id, settings, cred))

        first = timed(lambda: job("00000001-bench"))
        spare = timed(lambda: wait_for_refills(600))
        push_a_commit(local, bare, 1)
        second = timed(lambda: job("00000002-bench"))
        wait_for_refills(600)
        for ws in spaces:
            cleanup_workspace(ws, repo, settings, failed=False)
    shutil.rmtree(data, ignore_errors=True)
    return first, spare, second


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--commits", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to work (default: the system temp folder)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-workspace-", dir=args.dir) as tmp:
        work = Path(tmp)
        served = work / "served"
        served.mkdir()
        bare = make_bare_repo(served / "big.git")
        started = time.perf_counter()
        pack = generate(bare, args.files, args.commits)
        print(
            f"repo: {args.files} files, {args.commits} commits, pack {pack / 1e6:.1f} MB "
            f"(generated in {time.perf_counter() - started:.1f} s); git {_git_version()}"
        )
        local = work / "local"
        subprocess.run(["git", "clone", "-q", str(bare), str(local)], check=True)

        runner_ways = ["clone (mirror)", "worktree (mirror)", "worktree (local repo)", "clone (local repo)"]
        ways = [("plain git clone", 0)] + [(w, warm) for w in runner_ways for warm in (1, 0)]
        results: dict[tuple[str, int], list[tuple[float, float, float]]] = {w: [] for w in ways}
        with serve_git_http(served, USER, TOKEN) as base:
            url = f"{base}/big.git"
            cred = GitCredential(base.removeprefix("http://"), USER, TOKEN)
            for _ in range(args.rounds):
                for way, warm in ways:
                    results[way, warm].append(run_way(way, url, local, bare, work, cred, warm))

    # A plain clone is the same work for every job: its baseline is the median of all of them.
    plain = statistics.median(t for f, _, s in results["plain git clone", 0] for t in (f, s))
    print(f"\nmedian of {args.rounds} rounds, seconds; baseline: plain clone per job {plain:.2f} s")
    head = ("way", "first job", "spare (bg)", "second job", "second vs plain clone")
    print(f"| {head[0]:<34} | {head[1]:>9} | {head[2]:>10} | {head[3]:>10} | {head[4]:>21} |")
    print(f"|{'-' * 36}|{'-' * 10}:|{'-' * 11}:|{'-' * 11}:|{'-' * 22}:|")
    for way, warm in ways:
        rows = results[way, warm]
        first = statistics.median(r[0] for r in rows)
        spare = statistics.median(r[1] for r in rows)
        second = statistics.median(r[2] for r in rows)
        label = way if way == "plain git clone" else f"{way}, {'warm spare' if warm else 'no spare'}"
        shown = f"{spare:10.2f}" if warm else f"{'-':>10}"
        print(f"| {label:<34} | {first:9.2f} | {shown} | {second:10.2f} | {plain / second:20.1f}x |")


def _git_version() -> str:
    return subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.split()[-1]


if __name__ == "__main__":
    main()
