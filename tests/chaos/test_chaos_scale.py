"""Several instances on one PostgreSQL (issue 6, acceptance 2): limits hold across instances,
every job runs once, and a SIGKILLed instance's jobs are recovered by the others' watchdogs."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.chaos.harness import FAST_ENV, Cluster, check_invariants, excess_seconds, max_overlap, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("chaos")]

PER_INSTANCE = 4
PER_USER = 3
USERS = {"u1": 0.4, "u2": 0.25, "u3": 0.15, "u4": 0.1, "u5": 0.1}
# A claim stamps started_at just before it waits for the scheduler lock (store.jobs.claim), so a
# start can look up to that wait earlier than the finish it followed. A real breach of a limit
# overlaps for most of a job's run (>= 0.3 s here).
CLAIM_SKEW = 0.2


@pytest.mark.timeout(300)
def test_three_instances_300_jobs_limits_and_recovery(pg_database_url: str, tmp_path: Path) -> None:
    rng = random.Random()
    env = {"RUNNER_MAX_CONCURRENCY": str(PER_INSTANCE), "RUNNER_MAX_JOBS_PER_USER": str(PER_USER)}
    with Cluster(tmp_path / "cluster", pg_database_url, env=env) as c:
        users = rng.choices(list(USERS), weights=list(USERS.values()), k=300)
        ids = [c.submit(1, user=u, sleep=rng.uniform(0.3, 0.8))[0] for u in users]
        c.start("scale-w1", "worker")
        victim = c.start("scale-w2", "worker")
        c.start("scale-s1", "serve")

        # Kill w2 once the run is well under way and w2 has jobs running.
        wait_for(lambda: sum(r["status"] == "success" for r in c.rows().values()) >= 60, 120, "60 jobs done")
        running = wait_for(lambda: c.running_of("scale-w2"), 30, "w2 to run jobs")
        c.sigkill(victim)
        killed_at = time.monotonic()
        running = c.running_of("scale-w2")
        assert running, "w2 had no running job at the kill"
        wait_for(lambda: c.all_done(running), 20, "the watchdogs to recover w2's jobs", interval=0.02)
        recovery = time.monotonic() - killed_at
        bound = int(FAST_ENV["RUNNER_STALE_AFTER_SECONDS"]) + int(FAST_ENV["RUNNER_HEARTBEAT_SECONDS"])
        # Polling granularity and a loaded 2-core machine: 0.5 s of measuring slack.
        assert recovery <= bound + 0.5, f"recovered after {recovery:.2f} s, bound {bound} s"
        for row in c.rows(running).values():
            assert row["status"] == "failed" and row["error_code"] == "heartbeat_stale", row

        wait_for(lambda: c.all_done(ids), 240, "all 300 jobs")
        rows = check_invariants(c)
        ledger = c.ledger_ids()
        for job_id, row in rows.items():
            if job_id in running:
                continue
            assert row["status"] == "success", (job_id, row["status"], row["error_code"])
            assert ledger.count(job_id) == 1

        by_runner: dict[str, list] = defaultdict(list)
        by_user: dict[str, list] = defaultdict(list)
        for row in rows.values():
            by_runner[row["runner_id"]].append((row["started_at"], row["finished_at"]))
            by_user[row["requested_by"]].append((row["started_at"], row["finished_at"]))
        for runner_id, spans in by_runner.items():
            assert max_overlap(spans, CLAIM_SKEW) <= PER_INSTANCE, runner_id
        for user, spans in by_user.items():
            assert max_overlap(spans, CLAIM_SKEW) <= PER_USER, user
        # Nothing started on w2 after it died; the queue drained on the others.
        assert {r["runner_id"] for r in rows.values()} == {"scale-w1", "scale-w2", "scale-s1"}
        last_w2_start = max(r["started_at"] for r in rows.values() if r["runner_id"] == "scale-w2")
        after = [r for r in rows.values() if r["started_at"] > last_w2_start]
        assert after and {r["runner_id"] for r in after} <= {"scale-w1", "scale-s1"}
        per_runner = {k: len(v) for k, v in sorted(by_runner.items())}
        raw = {u: (max_overlap(s), round(excess_seconds(s, PER_USER), 3)) for u, s in sorted(by_user.items())}
        print(
            f"recovered in {recovery:.2f} s; jobs per instance {per_runner}; raw (max per user, longest excess s) {raw}"
        )
