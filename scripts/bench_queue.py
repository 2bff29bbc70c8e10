"""Micro-benchmark: one Redis stream entry per batch vs one entry per event.

service/queue.py stores each accepted batch as a single stream entry (fields ``n`` = event
count, ``b`` = the JSON body). The alternative is one entry per event (field ``e`` = that
event's JSON), sent as one non-transactional pipeline per batch. For batches of 10 and 100
realistic events this measures, against a real redis-server started by scripts.stack:

- enqueue events/s: XADDs for ~2 s (time-boxed) with the synchronous redis client;
- decode events/s: XRANGE the whole stream back in pages of ~1000 events and decode it
  with msgspec (one ``list[Event]`` decode per batch entry vs one ``Event`` decode per entry),
  reading it again until ~1 s has passed (the consumer side: read + decode);
- bytes/event: growth of INFO memory ``used_memory`` after the writes, divided by events.

Each case uses a fresh ``bench:`` stream key, deleted afterwards; each number is the median
of 3 runs. Run with ``python -m scripts.bench_queue`` (REDIS_URL/MONGO_URL reuse servers).
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import msgspec
import redis

from core.events import Event
from scripts.stack import running_stack, scratch_dir

SECONDS = 2.0
REPEATS = 3
SIZES = (10, 100)
POOL = 200  # distinct pre-encoded batches, cycled while writing
PAGE_EVENTS = 1000
TYPES = ("page_view", "click", "signup", "purchase", "logout")

_encode = msgspec.json.Encoder().encode
_batch_decoder = msgspec.json.Decoder(list[Event])
_event_decoder = msgspec.json.Decoder(Event)


def make_event(rng: random.Random, n: int) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": f"evt_{n:012d}",
        "account_id": f"acct_{rng.randrange(50):04d}",
        "user_id": f"user_{rng.randrange(100_000)}",
        "type": rng.choice(TYPES),
        "timestamp": f"2025-06-01T12:{rng.randrange(60):02d}:{rng.randrange(60):02d}."
        f"{rng.randrange(1000):03d}Z",
    }
    if rng.random() < 0.3:
        event["metadata"] = {"path": f"/p/{rng.randrange(500)}", "ms": rng.randrange(2000)}
    return event


def make_pool(size: int) -> list[tuple[bytes, list[bytes]]]:
    """(batch body, per-event bodies) for POOL batches of ``size`` events."""
    rng = random.Random(size)
    pool = []
    for b in range(POOL):
        events = [make_event(rng, b * size + i) for i in range(size)]
        pool.append((_encode(events), [_encode(e) for e in events]))
    return pool


def used_memory(client: redis.Redis) -> int:
    info: dict[str, Any] = client.info("memory")
    return int(info["used_memory"])


def write(client: redis.Redis, key: str, pool: list[tuple[bytes, list[bytes]]], layout: str) -> int:
    """XADD for SECONDS; return the number of events written."""
    size, written = len(pool[0][1]), 0
    deadline = time.perf_counter() + SECONDS
    while time.perf_counter() < deadline:
        body, events = pool[(written // size) % POOL]
        if layout == "per-batch":
            client.xadd(key, {"count": size, "body": body})
        else:
            pipe = client.pipeline(transaction=False)
            for event in events:
                pipe.xadd(key, {"e": event})
            pipe.execute()
        written += size
    return written


def read_and_decode(client: redis.Redis, key: str, layout: str, size: int) -> int:
    """XRANGE everything back and decode it; return the number of events decoded."""
    page = max(1, PAGE_EVENTS // size) if layout == "per-batch" else PAGE_EVENTS
    start, decoded = "-", 0
    while True:
        reply: Any = client.xrange(key, start, "+", page)
        entries: list[tuple[bytes, dict[bytes, bytes]]] = reply
        for _entry_id, fields in entries:
            if layout == "per-batch":
                decoded += len(_batch_decoder.decode(fields[b"body"]))
            else:
                _event_decoder.decode(fields[b"e"])
                decoded += 1
        if len(entries) < page:
            return decoded
        start = "(" + entries[-1][0].decode()


def run_case(client: redis.Redis, layout: str, size: int, run: int) -> tuple[float, ...]:
    pool = make_pool(size)
    key = f"bench:queue:{layout}:{size}:{run}"
    client.delete(key)
    before = used_memory(client)
    t0 = time.perf_counter()
    written = write(client, key, pool, layout)
    enqueue_s = time.perf_counter() - t0
    grown = used_memory(client) - before
    decoded, t0 = 0, time.perf_counter()
    while (decode_s := time.perf_counter() - t0) < SECONDS / 2:  # short; read it again
        decoded += read_and_decode(client, key, layout, size)
    client.delete(key)
    assert decoded % written == 0, (decoded, written)
    return written / enqueue_s, decoded / decode_s, grown / written


def table(client: redis.Redis) -> str:
    rows = ["| layout | batch size | enqueue events/s | decode events/s | bytes/event |"]
    rows.append("|---|---:|---:|---:|---:|")
    for size in SIZES:
        runs: dict[str, list[tuple[float, ...]]] = {"per-batch": [], "per-event": []}
        for run in range(REPEATS):
            for layout, results in runs.items():
                results.append(run_case(client, layout, size, run))
        medians = {
            k: [statistics.median(col) for col in zip(*v, strict=True)] for k, v in runs.items()
        }
        for layout, (enq, dec, mem) in medians.items():
            rows.append(f"| {layout} | {size} | {enq:,.0f} | {dec:,.0f} | {mem:,.0f} |")
        ratios = [b / e for b, e in zip(medians["per-batch"], medians["per-event"], strict=True)]
        cells = " | ".join(f"{r:.2f}x" for r in ratios)
        rows.append(f"| ratio per-batch/per-event | {size} | {cells} |")
    return "\n".join(rows)


def main() -> None:
    urls = os.environ.get("REDIS_URL", ""), os.environ.get("MONGO_URL", "")
    with (
        scratch_dir("bench-queue-") as tmp,
        running_stack(Path(tmp), *urls) as stack,
        redis.Redis.from_url(stack.redis_url) as client,
    ):
        print(table(client))


if __name__ == "__main__":
    main()
