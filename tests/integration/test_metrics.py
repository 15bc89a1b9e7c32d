"""`/metrics` after a success, a failure, a timeout and a cancel: each counter moves by exactly
one and the gauges match the store (issue 7)."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

COUNTERS = (
    "runner_job_starts_total",
    "runner_job_failures_total",
    "runner_job_timeouts_total",
    "runner_job_cancellations_total",
)


def scrape(runner: Any) -> dict[str, float]:
    r = runner.client.get("/metrics")
    assert r.status_code == 200
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            key = sample.name
            if sample.labels:
                key += "{" + ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())) + "}"
            values[key] = sample.value
    return values


def test_counters_and_gauges(runner_factory: Any) -> None:
    runner = runner_factory(RUNNER_MAX_CONCURRENCY="1")
    before = scrape(runner)
    assert runner.wait(runner.submit({})["id"])["status"] == "success"
    mid = scrape(runner)
    assert mid["runner_job_starts_total"] == before["runner_job_starts_total"] + 1
    assert runner.wait(runner.submit({"exit": 2})["id"])["status"] == "failed"
    assert runner.wait(runner.submit({"sleep": "30"}, script="short")["id"])["status"] == "timeout"
    running = runner.submit({"sleep": "30"})
    runner.wait(running["id"], {"running"})
    assert runner.client.post(f"/api/runner/jobs/{running['id']}/cancel").status_code == 202
    assert runner.wait(running["id"])["status"] == "canceled"

    after = scrape(runner)
    delta = {name: after[name] - before[name] for name in COUNTERS}
    # Four jobs started; each outcome counter moved once.
    assert delta == {
        "runner_job_starts_total": 4,
        "runner_job_failures_total": 1,
        "runner_job_timeouts_total": 1,
        "runner_job_cancellations_total": 1,
    }
    assert after["runner_job_duration_seconds_count{script_key=behave,status=success}"] >= 1
    assert after["runner_job_queue_wait_seconds_count"] >= 4
    assert after["runner_http_requests_total{method=GET,route=/api/runner/jobs/{job_id},status=200}"] > 0
    assert "runner_scheduler_lock_acquired" in after

    # Gauges are read from the store at scrape time.
    blocker = runner.submit({"sleep": "30"})
    runner.wait(blocker["id"], {"running"})
    queued = [runner.submit({}) for _ in range(2)]
    gauges = scrape(runner)
    counts = runner.runtime.jobs.counts_by_status()
    assert gauges["runner_jobs_queued"] == counts.get("queued", 0) == 2
    assert gauges["runner_jobs_running"] == counts.get("running", 0) == 1
    for job in [*queued, blocker]:
        runner.client.post(f"/api/runner/jobs/{job['id']}/cancel")
    runner.wait(blocker["id"])
    final = scrape(runner)
    assert final["runner_jobs_queued"] == 0 and final["runner_jobs_running"] == 0
