"""Log benchmark: (a) redaction (the current version) and writer throughput, (b) index build and page reads of a big
log, (c) latency from a line written by a job to an SSE client of `/logs/stream`.

Prints numbers; not a pass/fail test. Throughputs are given in CPU time (what one core does, the
machine may be shared) and in wall time. Targets: redaction and index build >= 50 MB/s, a 128 KiB
page anywhere in a 1 GiB log <= 20 ms once indexed, line-to-client latency p99 <= 250 ms.

(c) runs a real `codex-runner serve` (launcher on) in a subprocess, with a temp data dir and a
runner.toml whose script prints `tick <time.time_ns()>` every `--interval` seconds (flushing each
line) for `--latency-seconds`; an SSE client reads the job's stream from offset 0 and, for each line
received, takes receive time minus the time written in the line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from codex_runner.cli.follow import SseDecoder
from codex_runner.logs import LogWriter, read_page, redacted_size
from codex_runner.logs.redaction import REDACTION_VERSION, RULESETS
from codex_runner.logs.stream import MAX_LINE

RULES = RULESETS[REDACTION_VERSION]
MB = 1_000_000
PAGE = 128 * 1024
WORDS = [
    "parser",
    "value",
    "config",
    "cache",
    "request",
    "handler",
    "widget",
    "session",
    "result",
    "error",
    "index",
    "buffer",
    "reader",
]
WORDS += [
    "stream",
    "client",
    "server",
    "update",
    "record",
    "field",
    "schema",
    "queue",
    "worker",
    "the",
    "a",
    "to",
    "of",
    "and",
    "in",
]
FILES = ["src/widgets/parser.py", "src/widgets/cache.py", "tests/unit/test_parser.py", "lib/core/index.ts"]
SECRETS = [
    "OPENAI_API_KEY=sk-proj-Ab3dEf6hIj9kLmN0pQrStUvWxYz12345",
    "remote: https://x-access-token:ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8@github.com/o/r.git",
    "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
    'curl -H "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.dozjgNryP4J3jVmNHl0w5N"',
    'DB_PASSWORD="correct horse battery staple"',
]


def _ident(r: random.Random) -> str:
    return "_".join(r.sample(WORDS[:19], 2))


def _codex(r: random.Random) -> str:
    """codex exec --json events: command output, messages, reasoning, the odd usage line."""
    kind = r.random()
    item = f"item_{r.randint(1, 999)}"
    if kind < 0.3:
        lines = (
            f"{r.choice(FILES)}:{r.randint(1, 400)}: {_ident(r)} ok — ✓" for _ in range(r.randint(1, 12))
        )
        event = {
            "id": item,
            "type": "command_execution",
            "command": f"bash -lc 'pytest -q {r.choice(FILES)}'",
        }
        event |= {"aggregated_output": "\n".join(lines), "exit_code": 0, "status": "completed"}
        return json.dumps({"type": "item.completed", "item": event}, ensure_ascii=False)
    if kind < 0.97:
        text = " ".join(r.choice(WORDS) for _ in range(r.randint(8, 40)))
        kind_name = "agent_message" if kind < 0.6 else "reasoning"
        return json.dumps({"type": "item.completed", "item": {"id": item, "type": kind_name, "text": text}})
    usage = {
        "input_tokens": r.randint(1000, 90000),
        "cached_input_tokens": 0,
        "output_tokens": r.randint(1, 5000),
    }
    return json.dumps({"type": "turn.completed", "usage": usage})


def _tool(r: random.Random) -> list[str]:
    """Compiler, test runner and installer output, and diffs."""
    f, line, col = r.choice(FILES), r.randint(1, 900), r.randint(1, 80)
    kind = r.random()
    if kind < 0.8:
        return [
            r.choice(
                [
                    f'{f}:{line}:{col}: error: Incompatible types in assignment (expression has type "str")',
                    f"{f}:{line}:{col}: warning: unused variable '{_ident(r)}' [-Wunused-variable]",
                    f"tests/unit/test_{r.choice(WORDS)}.py::test_{_ident(r)} PASSED   [ {r.randint(1, 99)}%]",
                    f"Downloading https://files.pythonhosted.org/packages/ab/{r.choice(WORDS)}-1.0-py3-none-any.whl",
                    f"    |     let {_ident(r)} = self.{_ident(r)}.get(&key).cloned();",
                ]
            )
        ]
    out = [f"diff --git a/{f} b/{f}", f"@@ -{line},7 +{line},9 @@ def {_ident(r)}(self, key):"]
    for _ in range(r.randint(3, 15)):
        body = r.choice(
            [f"return self._{_ident(r)}.get(key)", f"if {_ident(r)} is None:", f"x = {_ident(r)}(1)"]
        )
        out.append(r.choice("+- ") + "    " + body)
    return out


def agent_output(size: int, seed: int = 1) -> bytes:
    """Realistic agent output: half codex JSON events, half tool output, about 1 secret per 10k lines."""
    r = random.Random(seed)
    parts: list[bytes] = []
    total = 0
    while total < size:
        kind = r.random()
        lines = [_codex(r)] if kind < 0.5 else [r.choice(SECRETS)] if kind > 0.9999 else _tool(r)
        for line in lines:
            data = (line + "\n").encode()
            parts.append(data)
            total += len(data)
    return b"".join(parts)[:size]


def timed(action: Callable[[], object]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    action()
    return time.process_time() - cpu, time.perf_counter() - wall


def bench_redaction(sample: bytes) -> None:
    chunks, pos = [], 0
    while pos < len(sample):  # whole-line chunks of about 64 KiB, as the reader cuts them
        end = sample.rfind(b"\n", pos, pos + MAX_LINE) + 1 or len(sample)
        chunks.append(sample[pos:end])
        pos = end

    def run() -> None:
        state = 0
        for chunk in chunks:
            _, state = RULES.redact(chunk, state)

    cpu, wall = min(timed(run) for _ in range(3))
    print(
        f"redaction {RULES.version}   {len(sample) / MB:8.1f} MB  {len(sample) / MB / cpu:7.1f} MB/s cpu  {len(sample) / MB / wall:7.1f} MB/s wall"
    )


def bench_writer(sample: bytes, folder: Path) -> None:
    secrets = ["sk-proj-Ab3dEf6hIj9kLmN0pQrStUvWxYz12345", "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"]
    chunks = [sample[i : i + 65536] for i in range(0, len(sample), 65536)]

    def run() -> None:
        with LogWriter(folder / "writer.log", max_bytes=1 << 40, known_secrets=secrets) as writer:
            for chunk in chunks:
                writer.write(chunk)

    cpu, wall = timed(run)
    (folder / "writer.log").unlink()
    print(
        f"writer         {len(sample) / MB:8.1f} MB  {len(sample) / MB / cpu:7.1f} MB/s cpu  {len(sample) / MB / wall:7.1f} MB/s wall"
    )


def bench_log(size: int, sample: bytes, folder: Path) -> None:
    log, index = folder / "big.log", folder / "index"
    with log.open("wb") as out:
        written = 0
        while written < size:
            out.write(sample[: size - written])
            written += min(len(sample), size - written)
    cpu, wall = timed(lambda: redacted_size(log, complete=True, index_dir=index))
    print(
        f"index build    {size / MB:8.1f} MB  {size / MB / cpu:7.1f} MB/s cpu  {size / MB / wall:7.1f} MB/s wall"
    )
    end = redacted_size(log, complete=True, index_dir=index)
    for name, offset in (("start", 0), ("middle", end // 2), ("end", end - PAGE)):
        times = []
        for _ in range(5):
            _, wall = timed(
                lambda o=offset: read_page(log, offset=o, limit=PAGE, complete=True, index_dir=index)
            )
            times.append(wall * 1000)
        print(
            f"page {name:7}  128 KiB at {offset:>13,}: median {statistics.median(times):6.2f} ms  max {max(times):6.2f} ms"
        )


TICKER = """
import sys, time
time.sleep(0.5)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    print("tick", time.time_ns(), flush=True)
    time.sleep(float(sys.argv[2]))
"""

LATENCY_TOML = """
[repos.bench]
source = {repo}
workspace = "scratch"

[scripts.ticker]
command = [{python}, "-c", {ticker}, {seconds}, {interval}]
timeout_seconds = {timeout}
"""


def _serve(
    folder: Path, seconds: float, interval: float
) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    """`codex-runner serve` with its launcher on a free port, healthy; (process, url, its env)."""
    repo = folder / "repo"
    git = ["git", "-C", str(repo), "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    repo.mkdir()
    (repo / "README.md").write_text("bench\n")
    for args in (["init", "-q", "-b", "main"], ["add", "README.md"], ["commit", "-q", "-m", "initial"]):
        subprocess.run([*git, *args], check=True, timeout=30)
    toml = LATENCY_TOML.format(
        repo=json.dumps(str(repo)),
        python=json.dumps(sys.executable),
        ticker=json.dumps(TICKER),
        seconds=json.dumps(str(seconds)),
        interval=json.dumps(str(interval)),
        timeout=int(seconds) + 60,
    )
    (folder / "runner.toml").write_text(toml)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env |= {
        "RUNNER_CONFIG": str(folder / "runner.toml"),
        "RUNNER_DATA_DIR": str(folder / "data"),
        "RUNNER_PORT": str(port),
        "RUNNER_ENABLED": "true",
        "RUNNER_LOG_FORMAT": "console",
    }
    cli = str(Path(sys.executable).parent / "codex-runner")
    with (folder / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [cli, "serve"], env=env, cwd=folder, stdout=log, stderr=log, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url, env
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    _stop(proc)
    raise SystemExit(f"codex-runner serve did not start:\n{(folder / 'serve.log').read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def bench_latency(folder: Path, seconds: float, interval: float) -> None:
    proc, url, env = _serve(folder, seconds, interval)
    try:
        cli = str(Path(sys.executable).parent / "codex-runner")
        made = subprocess.run(
            [cli, "tokens", "create", "--user", "bench", "--role", "admin"],
            env=env,
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        headers = {"Authorization": f"Bearer {made.stdout.strip()}"}
        with httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(10, read=30)) as http:
            body = {"repo": "bench", "script_key": "ticker", "args": {}}
            job = http.post("/api/runner/jobs", json=body).raise_for_status().json()
            latencies: list[float] = []
            status = "?"
            decoder = SseDecoder()
            with http.stream("GET", f"/api/runner/jobs/{job['id']}/logs/stream") as response:
                response.raise_for_status()
                for chunk in response.iter_bytes():
                    received = time.time_ns()
                    for event in decoder.feed(chunk):
                        if event.event == "end":
                            status = json.loads(event.data)["status"]
                        elif event.event == "log":
                            for written in re.findall(
                                r"^tick (\d+)$", json.loads(event.data)["content"], re.M
                            ):
                                latencies.append((received - int(written)) / 1e6)
    finally:
        _stop(proc)
    if not latencies:
        raise SystemExit(f"no tick line received (job {status})")
    p50, p95, p99 = (_percentile(latencies, q) for q in (50, 95, 99))
    print(
        f"SSE latency    {len(latencies):5d} lines every {interval * 1000:.0f} ms (job {status}): "
        f"p50 {p50:6.1f} ms  p95 {p95:6.1f} ms  p99 {p99:6.1f} ms  max {max(latencies):6.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=1 << 30, help="bytes of the big log (default 1 GiB)")
    parser.add_argument(
        "--sample", type=int, default=64 * MB, help="bytes of generated output for throughput"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to put the big log (default: a temp dir)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=["throughput", "pages", "latency"],
        help="run only these parts: (a) throughput, (b) pages, (c) latency (repeatable; default all)",
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=5.0, help="(c): how long the job prints (default 5)"
    )
    parser.add_argument(
        "--interval", type=float, default=0.02, help="(c): seconds between lines (default 0.02)"
    )
    args = parser.parse_args()
    parts = set(args.only or ["throughput", "pages", "latency"])
    folder = Path(tempfile.mkdtemp(prefix="bench-logs-", dir=args.dir))
    try:
        if parts & {"throughput", "pages"}:
            sample = agent_output(args.sample)
        if "throughput" in parts:
            bench_redaction(sample)
            bench_writer(sample, folder)
        if "pages" in parts:
            bench_log(args.size, sample, folder)
        if "latency" in parts:
            bench_latency(folder, args.latency_seconds, args.interval)
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
