"""`make bench`: same-run figures and ceilings, written to docs/PERFORMANCE.md.

In one run, on one machine, against real servers started here:

1. ingest, for batches of 1, 10, 100 and 500 events: requests/s, events/s and
   service CPU-seconds per 1M events, for
   - the framework ceiling: a bare Sanic app answering 202 without reading the
     body (``scripts/bench_apps.py``), same workers, same bodies;
   - the service (flusher and rollups off, so only the HTTP path is measured);
   - the queue ceiling: raw pipelined ``XADD`` of the same bodies from Python.
   Load comes from ``wrk`` (one thread: it leaves the CPU to the server).
2. flusher drain rate (events/s from the stream into MongoDB) against the store
   ceiling: a raw ``insert_many`` loop of the same documents, same database.
3. ``/summary`` 24h latency p50/p99 (``scripts/bench_rollups``).

Every figure is the median of ``--repeat`` runs. Writes docs/PERFORMANCE.md and
docs/ingest-throughput.png.

    python -m scripts.bench [--repeat 5] [--seconds 5] [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import redis
import uvloop

from scripts import bench_rollups
from scripts.harness import Service, cpu_seconds, exit_on_sigterm, service_env
from scripts.stack import ROOT, Stack, ensure_wrk, running_stack
from service import queue, store
from service.config import Settings, load_settings
from service.events import decode_events, to_document
from service.flusher import Flusher
from service.queue import Consumer

SIZES = (1, 10, 100, 500)
TYPES = ("page_view", "message_sent", "call_made", "form_submitted", "login", "custom")
DOCS = ROOT / "docs"
CONNECTIONS = 64
XADD_PIPELINE = 64


def make_body(size: int, rng: random.Random) -> bytes:
    now = datetime.now(UTC) - timedelta(minutes=1)
    events = []
    for i in range(size):
        event: dict[str, Any] = {
            "event_id": f"bench-{size}-{i}-{rng.randrange(10**9)}",
            "account_id": f"acct_{rng.randrange(50)}",
            "user_id": f"user_{rng.randrange(100_000)}",
            "type": rng.choice(TYPES),
            "timestamp": (now - timedelta(milliseconds=rng.randrange(60_000)))
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
        }
        if i % 10 == 0:
            event["metadata"] = {"source": "bench", "page": f"/p/{rng.randrange(50)}"}
        events.append(event)
    return msgspec.json.encode(events)


@dataclass
class Rate:
    """One measured configuration: medians over repeats."""

    requests_per_s: float
    events_per_s: float
    cpu_per_million: float = 0.0  # service CPU-seconds per 1M events
    redis_cpu_per_million: float = 0.0  # the same for redis-server (when started here)
    p50_ms: float = 0.0
    p99_ms: float = 0.0


@dataclass
class Results:
    machine: dict[str, str]
    ingest: dict[str, dict[int, Rate]] = field(default_factory=dict)
    flush: dict[str, float] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def median_rate(samples: list[Rate]) -> Rate:
    def med(get: Callable[[Rate], float]) -> float:
        return statistics.median(get(s) for s in samples)

    return Rate(
        med(lambda r: r.requests_per_s),
        med(lambda r: r.events_per_s),
        med(lambda r: r.cpu_per_million),
        med(lambda r: r.redis_cpu_per_million),
        med(lambda r: r.p50_ms),
        med(lambda r: r.p99_ms),
    )


# --- ingest over HTTP -------------------------------------------------------------


def wrk_once(url: str, body_file: Path, seconds: float) -> tuple[int, float, float, float]:
    """(requests, seconds, p50 ms, p99 ms) of one wrk run; fails on any non-202."""
    out = subprocess.run(
        [ensure_wrk(), "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s",
         "-s", str(ROOT / "scripts" / "post.lua"), f"{url}/events"],
        env={**os.environ, "BODY_FILE": str(body_file)}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    found = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if not found:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    requests, bad_status, socket_errors, micros, p50, p99 = map(int, found.groups())
    if bad_status or socket_errors:
        raise RuntimeError(
            f"{bad_status} non-2xx answers and {socket_errors} socket errors:\n{out}"
        )
    return requests, micros / 1e6, p50 / 1e3, p99 / 1e3


def measure_http(
    service: Service, body_file: Path, size: int, seconds: float, after: Callable[[], None],
    redis_pids: list[int],
) -> Rate:  # fmt: skip
    wrk_once(service.url, body_file, 1)  # warm-up
    after()
    pids = service.pids()
    cpu_before, redis_before = cpu_seconds(pids), cpu_seconds(redis_pids)
    requests, elapsed, p50, p99 = wrk_once(service.url, body_file, seconds)
    cpu = cpu_seconds(pids) - cpu_before
    redis_cpu = cpu_seconds(redis_pids) - redis_before
    after()
    per_million = 1e6 / (requests * size)
    return Rate(requests / elapsed, requests * size / elapsed, cpu * per_million,
                redis_cpu * per_million, p50, p99)  # fmt: skip


def xadd_once(client: redis.Redis, body: bytes, size: int, seconds: float) -> Rate:
    """Pipelined XADDs of ``body`` for ``seconds``: the queue ceiling."""
    key = f"bench:xadd:{size}"
    written = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        pipe = client.pipeline(transaction=False)
        for _ in range(XADD_PIPELINE):
            pipe.xadd(key, {"n": size, "b": body})
        pipe.execute()
        written += XADD_PIPELINE
    elapsed = time.perf_counter() - started
    client.delete(key)
    return Rate(written / elapsed, written * size / elapsed)


def bench_ingest(stack: Stack, work: Path, args: argparse.Namespace, results: Results) -> None:
    """Bare Sanic, the service and raw XADD, interleaved per size and repeat: a
    machine that drifts faster or slower mid-run moves all three alike."""
    rng = random.Random(7)
    raw = {size: make_body(size, rng) for size in args.sizes}
    bodies = {}
    for size, body in raw.items():
        bodies[size] = work / f"body-{size}.json"
        bodies[size].write_bytes(body)
    client = redis.Redis.from_url(stack.redis_url)
    env = service_env(stack.redis_url, stack.mongo_url, work, run_flusher="false",
                      run_rollups="false", queue_max_events=10**12)  # fmt: skip

    def clear_queue() -> None:
        client.delete(env["STREAM_KEY"], f"{env['STREAM_KEY']}:depth")

    redis_pids = [stack.redis.proc.pid] if stack.redis and stack.redis.proc else []
    bare = Service(env, workers=args.workers, app="scripts.bench_apps:create_bare_app")
    ours = Service(env, workers=args.workers)
    samples: dict[str, dict[int, list[Rate]]] = {
        name: {size: [] for size in args.sizes} for name in ("bare Sanic", "service", "raw XADD")
    }
    try:
        bare.start(work, ready_path="/health")
        ours.start(work)
        for _ in range(args.repeat):
            for size, body_file in bodies.items():
                for name, service in (("bare Sanic", bare), ("service", ours)):
                    samples[name][size].append(measure_http(
                        service, body_file, size, args.seconds, clear_queue, redis_pids
                    ))  # fmt: skip
                samples["raw XADD"][size].append(
                    xadd_once(client, raw[size], size, min(args.seconds, 3))
                )
                line = ", ".join(f"{name} {rates[size][-1].events_per_s:,.0f}"
                                 for name, rates in samples.items())  # fmt: skip
                print(f"[bench] batch {size}: events/s {line}", flush=True)
    finally:
        bare.stop()
        ours.stop()
        client.close()
    for name, by_size in samples.items():
        results.ingest[name] = {size: median_rate(rates) for size, rates in by_size.items()}


# --- flusher ----------------------------------------------------------------------


async def drain_with_flusher(settings: Settings, bodies: list[bytes]) -> float:
    """Seconds for the real Flusher to store every event of ``bodies`` from the stream."""
    client = queue.connect(settings.redis_url)
    mongo = store.connect(settings)
    db = store.database(mongo, settings)
    await mongo.drop_database(settings.mongo_db)
    consumer = Consumer(client, settings)
    await consumer.ensure_group()
    total = 0
    async with client.pipeline(transaction=False) as pipe:
        for body in bodies:
            count = len(decode_events(body))
            total += count
            pipe.xadd(settings.stream_key, {"n": count, "b": body})
        pipe.incrby(settings.queue_depth_key, total)
        await pipe.execute()
    stop = asyncio.Event()
    flusher = Flusher(consumer, store.events(db), settings, stop)
    started = time.perf_counter()
    task = asyncio.create_task(flusher.run())
    while int(await client.get(settings.queue_depth_key) or 0) > 0:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    stored = await store.events(db).count_documents({})
    await client.delete(settings.stream_key, settings.queue_depth_key)
    await mongo.drop_database(settings.mongo_db)
    await client.aclose()
    await mongo.close()
    if stored != total:
        raise RuntimeError(f"flusher stored {stored} of {total} events")
    return elapsed


async def insert_many_ceiling(settings: Settings, bodies: list[bytes]) -> float:
    """Seconds for a bare insert_many loop of the same documents (built beforehand)."""
    mongo = store.connect(settings)
    db = store.database(mongo, settings)
    await mongo.drop_database(settings.mongo_db)
    await store.ensure_event_indexes(db, settings)
    now = datetime.now(UTC)
    docs = [to_document(e, now) for body in bodies for e in decode_events(body)]
    coll = store.events(db)
    batch = settings.flush_batch_size
    started = time.perf_counter()
    for i in range(0, len(docs), batch):
        await coll.insert_many(docs[i : i + batch], ordered=False)
    elapsed = time.perf_counter() - started
    await mongo.drop_database(settings.mongo_db)
    await mongo.close()
    return elapsed


def bench_flusher(stack: Stack, args: argparse.Namespace, results: Results) -> None:
    rng = random.Random(11)
    rates: dict[str, list[float]] = {"raw insert_many": [], "flusher": [], "flusher, no copy": []}
    events = 0
    for run in range(args.repeat):
        bodies = [make_body(100, rng) for _ in range(max(1, args.flush_events // 100))]
        events = 100 * len(bodies)
        env = {"REDIS_URL": stack.redis_url, "MONGO_URL": stack.mongo_url,
               "MONGO_DB": f"bench_flush_{run}", "STREAM_KEY": f"bench:flush:{run}"}  # fmt: skip
        settings = load_settings(env)
        no_copy = load_settings({**env, "RECENT_COPY": "false"})
        rates["raw insert_many"].append(events / uvloop.run(insert_many_ceiling(settings, bodies)))
        rates["flusher"].append(events / uvloop.run(drain_with_flusher(settings, bodies)))
        rates["flusher, no copy"].append(events / uvloop.run(drain_with_flusher(no_copy, bodies)))
        figures = ", ".join(f"{k} {v[-1]:,.0f} events/s" for k, v in rates.items())
        print(f"[bench] flush run {run}: {figures}", flush=True)
    results.flush = {name: statistics.median(values) for name, values in rates.items()}
    results.flush["events"] = float(events)


# --- summary ------------------------------------------------------------------------


def bench_summary(stack: Stack, args: argparse.Namespace, results: Results) -> None:
    settings = load_settings({"MONGO_URL": stack.mongo_url, "REDIS_URL": stack.redis_url,
                              "MONGO_DB": "bench_summary"})  # fmt: skip
    results.summary = uvloop.run(
        bench_rollups.measure(settings, args.summary_events, args.summary_repeat)
    )


# --- report -------------------------------------------------------------------------


def describe_machine() -> dict[str, str]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    import sanic

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{memory_kib / 2**20:.0f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "sanic": sanic.__version__,
        "redis": next((w.split("=", 1)[1] for w in redis_version if w.startswith("v=")), "?"),
        "mongodb": "FerretDB v1.24.2 (SQLite backend)",
    }


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "n/a"


def ingest_table(results: Results, workers: int) -> list[str]:
    bare, ours, xadd = (results.ingest[k] for k in ("bare Sanic", "service", "raw XADD"))
    lines = [
        "| batch | bare Sanic req/s | service req/s | service / bare | service events/s "
        "| raw XADD events/s | service / XADD | CPU-s per 1M events: service + Redis "
        "| service p50 / p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sorted(ours):
        b, o, x = bare[size], ours[size], xadd[size]
        lines.append(
            f"| {size} | {b.requests_per_s:,.0f} | {o.requests_per_s:,.0f} "
            f"| {pct(o.requests_per_s, b.requests_per_s)} | {o.events_per_s:,.0f} "
            f"| {x.events_per_s:,.0f} | {pct(o.events_per_s, x.events_per_s)} "
            f"| {o.cpu_per_million:.1f} + {o.redis_cpu_per_million:.1f} "
            f"| {o.p50_ms:.1f} / {o.p99_ms:.1f} |"
        )
    return lines


def targets(results: Results) -> list[str]:
    """The issue's targets, checked against this run's figures."""
    lines = ["| target | this run | met |", "|---|---:|:-:|"]

    def row(name: str, value: float, goal: float, shown: str) -> None:
        lines.append(f"| {name} | {shown} | {'yes' if value >= goal else 'no'} |")

    bare, ours = results.ingest.get("bare Sanic", {}), results.ingest.get("service", {})
    if 10 in ours and 10 in bare:
        ratio = ours[10].requests_per_s / bare[10].requests_per_s
        row("10-event batches: ≥ 60% of the bare-Sanic request rate", ratio, 0.6, f"{ratio:.0%}")
    if 100 in ours:
        rate = ours[100].events_per_s
        row("100-event batches: ≥ 350,000 events/s", rate, 350_000, f"{rate:,.0f}")
    f = results.flush
    for name in ("flusher", "flusher, no copy"):
        if name in f:
            ratio = f[name] / f["raw insert_many"]
            label = "default" if name == "flusher" else "`RECENT_COPY=false`"
            row(f"flusher ({label}): ≥ 80% of raw insert_many", ratio, 0.8, f"{ratio:.0%}")
    return lines


def write_report(results: Results, args: argparse.Namespace, plot: Path) -> Path:
    m = results.machine
    f = results.flush
    s = results.summary
    lines = [
        "# Performance",
        "",
        "Written by `make bench` (`scripts/bench.py`); every figure is the median of "
        f"{args.repeat} runs of {args.seconds:g} s, and every ceiling was measured in the "
        "same run, on the same machine, interleaved with the figure it bounds (bare "
        "Sanic, service, raw XADD for each batch size in turn, every repeat). "
        "Regenerate rather than edit.",
        "",
        f"Machine: {m['cpu']}, {m['memory']} RAM, {m['os']}; Python {m['python']}, "
        f"Sanic {m['sanic']}, redis-server {m['redis']} (AOF, `appendfsync always`), "
        f"{m['mongodb']}. Measured {m['date']}.",
        "",
        f"## Ingest (`POST /events`, {args.workers} HTTP workers)",
        "",
        f"Load: `wrk -t1 -c{CONNECTIONS}` posting the same valid batch over and over "
        "(one thread, so the load generator leaves the CPU to the server). The service "
        "ran with the flusher and rollups off, so only the HTTP path is measured; "
        "the bare Sanic app answers 202 without reading the body; raw XADD is a "
        f"Python loop of pipelined `XADD`s ({XADD_PIPELINE} per round trip) of the same "
        "bodies into the same Redis. CPU-seconds are those of the service's processes "
        "and of redis-server during the measured seconds.",
        "",
        *ingest_table(results, args.workers),
        "",
        f"![events/s by batch size]({plot.name})",
        "",
        "## Flusher (stream → MongoDB)",
        "",
        f"{f['events']:,.0f} events (100-event stream entries) drained by the real "
        "`Flusher` (decode, build documents, `insert_many` into `events` and "
        "`events_recent`, XACK+XDEL) against a bare `insert_many` loop of the same "
        f"documents in batches of {load_settings({}).flush_batch_size} into the same database.",
        "",
        "| | events/s | share of ceiling |",
        "|---|---:|---:|",
        f"| raw insert_many (store ceiling) | {f['raw insert_many']:,.0f} | 100% |",
        f"| flusher (default: also copies into `events_recent`) | {f['flusher']:,.0f} "
        f"| {pct(f['flusher'], f['raw insert_many'])} |",
        f"| flusher with `RECENT_COPY=false` | {f['flusher, no copy']:,.0f} "
        f"| {pct(f['flusher, no copy'], f['raw insert_many'])} |",
        "",
        "## Targets",
        "",
        *targets(results),
        "",
        "What stands between a figure and its target, measured with py-spy "
        "(`python -m scripts.profile_ingest`), is in [PROFILE.md](PROFILE.md).",
        "",
        "## Summary (`GET /summary/{account}?window=24h`, uncached)",
        "",
        f"{s['events']:,.0f} raw events spread over 24 hours in one account; first rollup "
        f"pass {s['first_rollup_s']:.1f} s.",
        "",
        "| | p50 ms | p99 ms | runs |",
        "|---|---:|---:|---:|",
        f"| rollups (≤ 1440 buckets + live tail) | {s['ours_p50_s'] * 1e3:.1f} "
        f"| {s['ours_p99_s'] * 1e3:.1f} | {s['ours_runs']:.0f} |",
        f"| naive: aggregate every raw event | {s['naive_p50_s'] * 1e3:.1f} "
        f"| {s['naive_p99_s'] * 1e3:.1f} | {s['naive_runs']:.0f} |",
        "",
        *results.notes,
    ]
    path = DOCS / "PERFORMANCE.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    styles = {"raw XADD": "s--", "bare Sanic": "^:", "service": "o-"}
    for name, style in styles.items():
        rates = results.ingest[name]
        sizes = sorted(rates)
        ax.plot(sizes, [rates[s].events_per_s for s in sizes], style, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("events per batch (request or stream entry)")
    ax.set_ylabel("events/s (median)")
    ax.set_title(f"Ingest throughput, same run ({results.machine['date']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--flush-events", type=int, default=50_000)
    parser.add_argument("--summary-events", type=int, default=20_000)
    parser.add_argument("--summary-repeat", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="1 repeat of 2 s, small sizes")
    parser.add_argument(
        "--only", choices=("ingest", "flush", "summary"), help="measure one part; no report"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.seconds, args.flush_events, args.summary_events = 1, 2.0, 5_000, 2_000
    ensure_wrk()
    exit_on_sigterm()
    results = Results(machine=describe_machine())
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, running_stack(
        Path(tmp) / "var", os.environ.get("REDIS_URL", ""), os.environ.get("MONGO_URL", "")
    ) as stack:  # fmt: skip
        if args.only in (None, "ingest"):
            bench_ingest(stack, Path(tmp), args, results)
        if args.only in (None, "flush"):
            bench_flusher(stack, args, results)
        if args.only in (None, "summary"):
            bench_summary(stack, args, results)
    if args.only:
        print(results)
        return 0
    plot = DOCS / "ingest-throughput.png"
    write_plot(results, plot)
    report = write_report(results, args, plot)
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
