"""Prometheus metrics shared by every process of the service.

prometheus-client's multiprocess mode aggregates the samples each process
writes under ``PROMETHEUS_MULTIPROC_DIR`` (set by the main process before it
starts the others, see :func:`export_metrics_dir`). Figures that live in
Redis or MongoDB (queue depth, rollup lag) are read at scrape time instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

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
ENTRIES_CLAIMED_AWAY = Counter(
    "flush_entries_claimed_away_total",
    "Entries another flusher claimed while this one was storing them (it retires them)",
)
STREAM_CLIENTS_DROPPED = Counter(
    "stream_clients_dropped_total", "GET /stream clients dropped for falling behind"
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
ROLLUP_RUNS = Counter("rollup_runs_total", "Rollup job runs", ["outcome"])
ROLLUP_ACCOUNTS = Counter("rollup_accounts_rolled_total", "Account rollovers written")
ROLLUP_DOCUMENTS = Counter("rollup_documents_written_total", "Rollup documents written", ["kind"])
ROLLUP_SECONDS = Histogram(
    "rollup_pass_seconds",
    "Time of one rollover pass over the accounts of a rollup partition that were due",
    ["partition"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 120),
)
ROLLUP_PASS_ACCOUNTS = Histogram(
    "rollup_pass_accounts",
    "Accounts due in one rollover pass over a rollup partition",
    ["partition"],
    buckets=(0, 10, 100, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 100_000),
)
ROLLUP_PARTITIONS_HELD = Gauge(
    "rollup_partitions_held",
    "Rollup partitions whose lease the live rollups processes hold (ROLLUP_PARTITIONS when "
    "every partition has a holder)",
    multiprocess_mode="livesum",
)
RETENTION_DELETED = Counter(
    "retention_deleted_total", "Documents deleted by retention", ["collection"]
)


@dataclass(frozen=True)
class Live:
    """A figure read at scrape time: one value, or one per label value."""

    help: str
    value: float | Mapping[str, float]
    label: str = ""


def render(live_values: Mapping[str, Live]) -> bytes:
    """All processes' samples plus the figures read right now."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    text = generate_latest(registry)
    live = CollectorRegistry()
    for name, figure in live_values.items():
        if isinstance(figure.value, Mapping):
            gauge = Gauge(name, figure.help, [figure.label], registry=live)
            for label_value, value in figure.value.items():
                gauge.labels(label_value).set(value)
        else:
            Gauge(name, figure.help, registry=live).set(figure.value)
    return text + generate_latest(live)


def mark_process_dead(pid: int) -> None:
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def export_metrics_dir(metrics_dir: Path, main_pid: int) -> Path:
    """Point prometheus-client's multiprocess mode at a per-run directory.

    The directory comes from the settings (``VAR_DIR/metrics/<main pid>``), but
    prometheus-client takes it only from ``PROMETHEUS_MULTIPROC_DIR``: this sets
    that variable (the only one the service writes; ``core/settings.py``), and
    child processes inherit it, so every HTTP worker, flusher and the rollups
    process write their samples where ``/metrics`` reads them. A variable already
    set wins: whoever started the service chose the directory (the tests give
    each service its own).
    """
    current = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if current:
        return Path(current)
    path = metrics_dir.resolve() / str(main_pid)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


PROCESS_RSS = Gauge(
    "process_rss_bytes", "Resident memory of each process of the service, by role", ["role"],
    multiprocess_mode="liveall",
)  # fmt: skip
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def report_rss(role: str) -> None:
    """This process's resident memory, as /proc says now (called every few seconds)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return
    PROCESS_RSS.labels(role).set(pages * _PAGE_SIZE)


ROLLUP_ACCOUNT_FAILURES = Counter(
    "rollup_account_failures_total",
    "Account rollovers that failed in a pass (retried the next run), by reason",
    ["reason"],
)
ROLLUP_ORPHANS_DELETED = Counter(
    "rollup_orphans_deleted_total",
    "Rollup documents no head would delete (a dead pass's drafts, an idle head's retired)",
    ["kind"],
)
ERASED_QUEUED = Counter(
    "erasure_dropped_events_total",
    "Queued events a flusher kept out of the store because an erasure's tombstone matched them",
)
ERASURE_RUNS = Counter("erasure_runs_total", "Erasure runs, by scope kind and outcome",
                       ["kind", "outcome"])  # fmt: skip
