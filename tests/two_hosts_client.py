"""The client side of the two-host test, run inside the client's network namespace.

    python -m tests.two_hosts_client drive --hosts URL,URL --run R --log FILE --stop FILE
    python -m tests.two_hosts_client wait --url URL
    python -m tests.two_hosts_client pending --redis URL --stream-key K --consumers PREFIX
    python -m tests.two_hosts_client verify --redis URL --mongo URL --db NAME --stream-key K \
        --service URL --run R --log FILE

``drive`` posts batches to the hosts in turn and logs each batch's outcome (one
JSON line each); ``verify`` checks what the log says against MongoDB and the
service: every 202 stored exactly once, nothing shed or refused stored, a batch
with an unknown outcome stored whole or not at all, and every summary equal to
the raw events. Each prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pymongo
import redis

from core import keys
from core.settings import load_settings
from tests.harness import json_lines
from tests.oracle import figures, ground_truth, parse_iso

BATCH = 20
ACCOUNTS = 5


def account(run: str, n: int) -> str:
    return f"two-{run}-a{n % ACCOUNTS}"


def drive(hosts: list[str], run: str, log: Path, stop: Path, seconds: float) -> dict[str, Any]:
    resting: dict[str, float] = {}
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    n = 0
    with log.open("a") as out, httpx.Client(timeout=10) as client:
        while time.monotonic() < deadline and not stop.exists():
            host = hosts[n % len(hosts)]
            n += 1
            if resting.get(host, 0) > time.monotonic():
                continue
            batch_id = f"{run}-{n}"
            target = account(run, n)
            events = [{"event_id": f"{batch_id}.{i}", "account_id": target,
                       "user_id": f"user_{(n + i) % 13}", "type": ("login", "page_view")[i % 2],
                       "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                      for i in range(BATCH)]  # fmt: skip
            try:
                response = client.post(f"{host}/events", json=events)
                outcome = {202: "accepted", 429: "shed", 503: "shed"}.get(
                    response.status_code, "refused" if response.status_code < 500 else "unknown"
                )
            except httpx.ConnectError:
                outcome = "never sent"  # nothing reached the host
                resting[host] = time.monotonic() + 1
            except httpx.HTTPError:
                outcome = "unknown"  # it may or may not have been taken
                resting[host] = time.monotonic() + 1
            outcomes[outcome] += 1
            out.write(json.dumps({"batch": batch_id, "host": host, "account": target,
                                  "outcome": outcome, "events": [e["event_id"] for e in events]})
                      + "\n")  # fmt: skip
            out.flush()
    return dict(outcomes)


def wait_ready(url: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return {"ready": True}
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return {"ready": False}


def pending(redis_url: str, stream_key: str, prefix: str) -> dict[str, Any]:
    settings = load_settings({"STREAM_KEY": stream_key})
    client = redis.Redis.from_url(redis_url)
    owned = 0
    for part in keys.partitions(settings):
        if not client.exists(part.stream):
            continue
        for consumer in client.xinfo_consumers(part.stream, keys.GROUP):
            if consumer["name"].decode().startswith(prefix):
                owned += int(consumer["pending"])
    depth = sum(int(client.get(p.depth) or 0) for p in keys.partitions(settings))
    return {"pending": owned, "depth": depth}


def verify(args: argparse.Namespace) -> dict[str, Any]:
    batches = json_lines(Path(args.log))
    mongo: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(args.mongo, tz_aware=True)
    events = mongo[args.db][keys.EVENTS]
    stored = Counter(d["event_id"] for d in events.find({}, {"event_id": 1}))
    problems: list[str] = []
    sent: set[str] = set()
    for batch in batches:
        ids = batch["events"]
        sent.update(ids)
        found = [stored[i] for i in ids]
        if any(n > 1 for n in found):
            problems.append(f"{batch['batch']}: stored more than once")
        if batch["outcome"] == "accepted" and not all(n == 1 for n in found):
            problems.append(f"{batch['batch']}: answered 202 but not stored")
        if batch["outcome"] in ("shed", "refused", "never sent") and any(found):
            problems.append(f"{batch['batch']}: {batch['outcome']} but stored")
        if batch["outcome"] == "unknown" and any(found) and not all(found):
            problems.append(f"{batch['batch']}: timed out and stored partly")
    extra = set(stored) - sent
    if extra:
        problems.append(f"{len(extra)} stored events were never sent")
    summaries = 0
    for n in range(ACCOUNTS):
        got = httpx.get(f"{args.service}/summary/{account(args.run, n)}",
                        params={"window": "1h", "top": 10}, timeout=30).json()  # fmt: skip
        truth = ground_truth(events, account(args.run, n), parse_iso(got["from"]),
                             parse_iso(got["to"]), 10)  # fmt: skip
        if figures(got) != truth:
            problems.append(f"summary of {account(args.run, n)}: {figures(got)} != {truth}")
        summaries += 1
    outcomes = Counter(b["outcome"] for b in batches)
    return {"ok": not problems, "problems": problems[:20], "batches": dict(outcomes),
            "accepted_events": outcomes["accepted"] * BATCH, "stored_events": sum(stored.values()),
            "summaries_checked": summaries}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.two_hosts_client")
    sub = parser.add_subparsers(dest="verb", required=True)
    d = sub.add_parser("drive")
    d.add_argument("--hosts", required=True)
    d.add_argument("--run", required=True)
    d.add_argument("--log", type=Path, required=True)
    d.add_argument("--stop", type=Path, required=True)
    d.add_argument("--seconds", type=float, default=120)
    w = sub.add_parser("wait")
    w.add_argument("--url", required=True)
    p = sub.add_parser("pending")
    p.add_argument("--redis", required=True)
    p.add_argument("--stream-key", required=True)
    p.add_argument("--consumers", required=True)
    v = sub.add_parser("verify")
    for name in ("--redis", "--mongo", "--db", "--stream-key", "--service", "--run", "--log"):
        v.add_argument(name, required=True)
    args = parser.parse_args(argv)
    if args.verb == "drive":
        result = drive(args.hosts.split(","), args.run, args.log, args.stop, args.seconds)
    elif args.verb == "wait":
        result = wait_ready(args.url)
    elif args.verb == "pending":
        result = pending(args.redis, args.stream_key, args.consumers)
    else:
        result = verify(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
