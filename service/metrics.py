"""Prometheus metrics shared by every process of the service.

prometheus-client's multiprocess mode aggregates the samples each process
writes under ``PROMETHEUS_MULTIPROC_DIR`` (set by the main process before it
starts the others, see ``config.export_metrics_dir``). Figures that live in
Redis or MongoDB (queue depth, rollup lag) are read at scrape time instead.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

EVENTS_ACCEPTED = Counter("events_accepted_total", "Events answered with 202")
REQUESTS_REJECTED = Counter(
    "ingest_requests_rejected_total", "POST /events requests refused", ["reason"]
)
EVENTS_REJECTED = Counter(
    "events_rejected_total", "Events in refused POST /events requests", ["reason"]
)
EVENTS_STORED = Counter("events_stored_total", "Events newly written to MongoDB")
EVENTS_DUPLICATE = Counter(
    "events_duplicate_total", "Events already in MongoDB when flushed (re-sent or re-delivered)"
)
DEAD_LETTERED = Counter(
    "dead_lettered_batches_total", "Stream entries moved to the dead-letter stream"
)
FLUSH_ERRORS = Counter("flush_errors_total", "Failed flush attempts (retried)", ["kind"])
FLUSH_BATCH_EVENTS = Histogram(
    "flush_batch_events",
    "Events per insert_many",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
)
FLUSH_SECONDS = Histogram(
    "flush_seconds",
    "Time to write one batch to MongoDB and acknowledge it",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PROCESS_RESTARTS = Counter(
    "process_restarts_total", "Dead service processes restarted by the watchdog", ["process"]
)
ROLLUP_RUNS = Counter("rollup_runs_total", "Rollup job runs", ["outcome"])
ROLLUP_BUCKETS = Counter("rollup_buckets_written_total", "Rollup buckets written", ["resolution"])


def render(live_values: Mapping[str, tuple[str, float]]) -> bytes:
    """All processes' samples plus gauges read right now (name -> (help, value))."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    text = generate_latest(registry)
    live = CollectorRegistry()
    for name, (help_text, value) in live_values.items():
        Gauge(name, help_text, registry=live).set(value)
    return text + generate_latest(live)


def mark_process_dead(pid: int) -> None:
    multiprocess.mark_process_dead(pid)
