"""Prometheus metrics (SPEC §8). Counters move on the events the store commits; gauges are read
from the store at scrape time so they always match it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from codex_runner.runtime import Runtime

DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400)
HTTP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_queued = Gauge("runner_jobs_queued", "Jobs waiting to run", registry=r)
        self.jobs_running = Gauge("runner_jobs_running", "Jobs running or being canceled", registry=r)
        self.starts = Counter("runner_job_starts_total", "Jobs started", registry=r)
        self.failures = Counter("runner_job_failures_total", "Jobs that ended failed", registry=r)
        self.timeouts = Counter("runner_job_timeouts_total", "Jobs that timed out", registry=r)
        self.cancellations = Counter("runner_job_cancellations_total", "Jobs canceled", registry=r)
        self.lock_acquired = Gauge(
            "runner_scheduler_lock_acquired",
            "1 when this instance's last claim pass took the scheduler lock",
            registry=r,
        )
        self.job_duration = Histogram(
            "runner_job_duration_seconds",
            "Run time of finished jobs",
            ["script_key", "status"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "runner_job_queue_wait_seconds", "Time from create to start", buckets=DURATION_BUCKETS, registry=r
        )
        self.http_requests = Counter(
            "runner_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.http_latency = Histogram(
            "runner_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )

        # Moved by the server's connection gate (api/gate.py), for `serve` and a worker's metrics port.
        self.http_connections = Gauge(
            "runner_http_connections", "HTTP connections open and served", registry=r
        )
        self.http_connections_refused = Counter(
            "runner_http_connections_refused_total",
            "HTTP connections refused over RUNNER_HTTP_MAX_CONNECTIONS",
            registry=r,
        )

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        """One answered request, by route template (never the raw path: bounded label values)."""
        self.http_requests.labels(method=method, route=route, status=str(status)).inc()
        self.http_latency.labels(method=method, route=route).observe(seconds)

    def on_event(self, event: dict[str, Any]) -> None:
        """A JobStore listener: one committed event moves at most one counter."""
        kind = event["event_type"]
        if kind == "job_started":
            self.starts.inc()
        elif kind in {"job_failed", "heartbeat_stale_recovered", "recovered_after_crash"}:
            self.failures.inc()
        elif kind == "job_timeout":
            self.timeouts.inc()
        elif kind == "job_canceled":
            self.cancellations.inc()

    def observe_finished(self, script_key: str, status: str, seconds: float) -> None:
        self.job_duration.labels(script_key=script_key, status=status).observe(seconds)


def render(runtime: Runtime) -> tuple[bytes, str]:
    metrics = runtime.metrics
    counts = runtime.jobs.counts_by_status()
    metrics.jobs_queued.set(counts.get("queued", 0))
    metrics.jobs_running.set(counts.get("running", 0) + counts.get("cancel_requested", 0))
    return generate_latest(metrics.registry), CONTENT_TYPE_LATEST
