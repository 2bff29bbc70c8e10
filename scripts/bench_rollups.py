"""Benchmark: /summary from rollups vs the naive aggregation over raw events.

Fills one account with N raw events (default 1,000,000) spread over the last
24h, runs the rollup job once, then in the same run measures, uncached:

- our summary (``service.summary.compute``: <= 1440 minute buckets + live tail),
- the naive answer: one $match/$group aggregation over the raw events,
- and the two ways of counting raw events for a bucket recompute (reading rows
  and counting in Python, vs a $group on (type, user)), to back the choice in
  ``rollups/jobs.py``.

    python -m scripts.bench_rollups [--events 1000000] [--repeat 20]

Uses REDIS_URL / MONGO_URL when set, else starts its own servers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rollups import jobs
from rollups import store as rollup_store
from rollups.buckets import HOUR, Counts, floor
from scripts.stack import running_stack
from service import store
from service.config import Settings, load_settings
from service.events import Event, to_document
from service.summary import compute

ACCOUNT = "bench_acc"
TYPES = ["page_view", "message_sent", "call_made", "form_submitted", "login"]


def make_docs(count: int, now: datetime) -> list[dict[str, Any]]:
    step = timedelta(hours=24) / count
    docs = []
    for i in range(count):
        ts = now - timedelta(minutes=1) - step * i
        event = Event(event_id=f"e{i}", account_id=ACCOUNT, user_id=f"user_{i * 7919 % 5000}",
                      type=TYPES[i % 5], timestamp=ts)  # fmt: skip
        docs.append(to_document(event, ts + timedelta(seconds=1)))
    return docs


async def timed(action: Callable[[], Awaitable[Any]], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        await action()
        out.append(time.perf_counter() - started)
    return out


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def naive_summary(db: Any, start: datetime, end: datetime) -> dict[str, Any]:
    """The fastest O(events) answer available: every raw event of the window, counted.

    (A $match/$group pipeline gives the same figures but runs ~30x slower on
    FerretDB v1; see the last table.)
    """
    query = {"account_id": ACCOUNT, "timestamp": {"$gte": start, "$lt": end}}
    types: Counter[str] = Counter()
    users: Counter[str] = Counter()
    async for row in store.events(db).find(query, {"type": 1, "user_id": 1}, batch_size=10_000):
        types[row["type"]] += 1
        users[row["user_id"]] += 1
    return {"total": sum(types.values()), "unique_users": len(users)}


async def group_counts(db: Any, hour: datetime) -> Counts:
    match = {"$match": {"account_id": ACCOUNT, "timestamp": {"$gte": hour, "$lt": hour + HOUR}}}
    group = {"$group": {"_id": {"t": "$type", "u": "$user_id"}, "n": {"$sum": 1}}}
    counts = Counts()
    async for row in await store.events(db).aggregate([match, group]):
        counts.add_event(row["_id"]["t"], row["_id"]["u"], row["n"])
    return counts


async def measure(settings: Settings, count: int, repeat: int) -> dict[str, float]:
    """Fill, roll up, time both summaries; figures in seconds (and counts)."""
    client = store.connect(settings, 600)
    db = store.database(client, settings)
    await client.drop_database(settings.mongo_db)
    await store.ensure_event_indexes(db, settings)
    await rollup_store.ensure_indexes(db)
    now = datetime.now(UTC)
    docs = make_docs(count, now)
    started = time.perf_counter()
    for i in range(0, len(docs), 10_000):
        await store.insert_events(store.events(db), docs[i : i + 10_000])
    recent = [d for d in docs if d["ingested_at"] > now - store.RECENT_KEEP]
    await store.insert_events(store.recent(db), recent)
    await store.mark_recent_copy(db, True, now - timedelta(days=1))  # as if copying all along
    copy_since = await store.recent_copy_since(db)
    fill = time.perf_counter() - started
    started = time.perf_counter()
    result = await jobs.run_once(db, settings, now=now)
    rollup = time.perf_counter() - started
    assert result is not None
    # the steady state: the job keeps W seconds behind now (a long first pass
    # would otherwise leave the live tail to scan all raw events)
    started = time.perf_counter()
    await jobs.run_once(db, settings)
    catch_up = time.perf_counter() - started
    watermark = await rollup_store.read_watermark(db)

    async def ours() -> dict[str, Any]:
        body, _ = await compute(db, ACCOUNT, "24h", 5, datetime.now(UTC), watermark, copy_since)
        return body

    body = await ours()
    expected = await naive_summary(db, datetime.fromisoformat(body["from"]),
                                   datetime.fromisoformat(body["to"]))  # fmt: skip
    assert (body["total"], body["unique_users"]) == (expected["total"], expected["unique_users"])
    ours_s = await timed(ours, repeat)
    to = datetime.now(UTC)
    naive_s = await timed(
        lambda: naive_summary(db, to - timedelta(hours=24), to), max(3, repeat // 5)
    )
    hour = floor(now - timedelta(hours=5), "hour")
    window = {"account_id": ACCOUNT, "timestamp": {"$gte": hour, "$lt": hour + HOUR}}
    python_s = await timed(lambda: jobs.count_raw(db, window, now, "hour"), 1)
    group_s = await timed(lambda: group_counts(db, hour), 1)
    await client.drop_database(settings.mongo_db)
    await client.close()
    return {
        "events": count,
        "fill_s": fill,
        "first_rollup_s": rollup,
        "catch_up_s": catch_up,
        "minute_buckets": result.minute_buckets,
        "hour_buckets": result.hour_buckets,
        "ours_p50_s": pct(ours_s, 0.5),
        "ours_p99_s": pct(ours_s, 0.99),
        "ours_runs": len(ours_s),
        "naive_p50_s": pct(naive_s, 0.5),
        "naive_p99_s": pct(naive_s, 0.99),
        "naive_runs": len(naive_s),
        "count_python_s": statistics.median(python_s),
        "count_group_s": statistics.median(group_s),
    }


async def run(settings: Settings, count: int, repeat: int) -> None:
    f = await measure(settings, count, repeat)
    print(f"\n{count:,} raw events over 24h; fill {f['fill_s']:.1f}s; first rollup run "
          f"{f['first_rollup_s']:.1f}s ({f['minute_buckets']:.0f} minute + "
          f"{f['hour_buckets']:.0f} hour buckets); "
          f"catch-up run {f['catch_up_s']:.1f}s\n")  # fmt: skip
    print("| /summary 24h, uncached | p50 ms | p99 ms | runs |")
    print("|---|---:|---:|---:|")
    print(f"| rollups (<= 1440 buckets + tail) | {f['ours_p50_s'] * 1e3:.1f} "
          f"| {f['ours_p99_s'] * 1e3:.1f} | {f['ours_runs']:.0f} |")  # fmt: skip
    print(f"| naive: every raw event of the window | {f['naive_p50_s'] * 1e3:.1f} "
          f"| {f['naive_p99_s'] * 1e3:.1f} | {f['naive_runs']:.0f} |")  # fmt: skip
    print(f"| ratio naive / rollups (p50) | {f['naive_p50_s'] / f['ours_p50_s']:.1f}x | | |\n")
    print("| counting one hour of raw events | median ms |")
    print("|---|---:|")
    print(f"| read rows, count in Python | {f['count_python_s'] * 1e3:.1f} |")
    print(f"| $group on (type, user) | {f['count_group_s'] * 1e3:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="bench-rollups-") as tmp,
        running_stack(
            Path(tmp), os.environ.get("REDIS_URL", ""), os.environ.get("MONGO_URL", "")
        ) as stack,
    ):
        settings = load_settings({"MONGO_URL": stack.mongo_url, "REDIS_URL": stack.redis_url,
                                  "MONGO_DB": "bench_rollups"})  # fmt: skip
        asyncio.run(run(settings, args.events, args.repeat))


if __name__ == "__main__":
    main()
