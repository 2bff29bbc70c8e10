"""Check a k6 run against what was stored: nothing lost, nothing doubled, nothing extra.

k6's JSON output holds one ``batch_outcome`` sample per POST (``k6/lib/events.js``):
its batch id, event count and outcome. Then:

- every event of an *accepted* batch (202) is stored exactly once;
- no event of a *shed* (429/503) or *refused* (other 4xx) batch is stored;
- a batch with an *unknown* outcome (timeout, connection error) is stored
  entirely or not at all;
- no event of the run is stored that k6 never sent;
- ``GET /summary`` for every account of the run equals the figures counted
  straight from the stored raw events.

Usage::

    python -m scripts.k6_verify --k6-json out.json --run-id R --mongo-url URL --db NAME \
        --base-url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pymongo

SUMMARY_WINDOW = "1h"
SUMMARY_TOP = 10
SUMMARY_TIMEOUT = 60.0


@dataclass
class Sent:
    """What k6 says it sent, by batch id: (event count, outcome)."""

    batches: dict[str, tuple[int, str]] = field(default_factory=dict)

    def events(self, outcome: str) -> int:
        return sum(n for n, o in self.batches.values() if o == outcome)

    def count(self, outcome: str) -> int:
        return sum(1 for _n, o in self.batches.values() if o == outcome)


@dataclass
class Verdict:
    sent: Sent
    stored: int = 0
    problems: list[str] = field(default_factory=list)
    summaries_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


class _Point(msgspec.Struct):
    metric: str
    type: str
    data: dict[str, Any] = {}


def read_k6_output(path: Path) -> Sent:
    decoder = msgspec.json.Decoder(_Point)
    sent = Sent()
    with path.open("rb") as lines:
        for line in lines:
            if b'"batch_outcome"' not in line:
                continue
            point = decoder.decode(line)
            if point.type != "Point" or point.metric != "batch_outcome":
                continue
            tags = point.data["tags"]
            sent.batches[tags["batch"]] = (int(point.data["value"]), tags["outcome"])
    return sent


def figures_from(
    docs: Iterable[dict[str, Any]], start: datetime, end: datetime, top: int
) -> dict[str, Any]:
    """The figures /summary must report, counted from raw event documents."""
    types: Counter[str] = Counter()
    users: Counter[str] = Counter()
    for doc in docs:
        if start <= doc["timestamp"] < end:
            types[doc["type"]] += 1
            users[doc["user_id"]] += 1
    return {
        "total": sum(types.values()),
        "totals": dict(sorted(types.items())),
        "unique_users": len(users),
        # counted here, not with the service's helper, so a tie-break bug cannot hide
        "top_users": [
            {"user_id": u, "events": users[u]}
            for u in sorted(users, key=lambda u: (-users[u], u))[:top]
        ],
    }


def summary_figures(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in ("total", "totals", "unique_users", "top_users")}


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def stored_events(
    events: pymongo.collection.Collection[dict[str, Any]], run_id: str
) -> Iterator[dict[str, Any]]:
    prefix = f"k6-{run_id}-"
    fields = {"_id": 0, "event_id": 1, "account_id": 1, "user_id": 1, "type": 1, "timestamp": 1}
    for doc in events.find({}, fields):
        if doc["account_id"].startswith(prefix):
            yield doc


def check_storage(sent: Sent, docs: list[dict[str, Any]], verdict: Verdict) -> None:
    stored_per_batch: Counter[str] = Counter()
    copies = Counter(doc["event_id"] for doc in docs)
    doubled = [event_id for event_id, n in copies.items() if n > 1]
    if doubled:
        verdict.problems.append(f"{len(doubled)} events stored more than once, e.g. {doubled[:3]}")
    for event_id in copies:
        stored_per_batch[event_id.rsplit(".", 1)[0]] += 1
    never_sent = [b for b in stored_per_batch if b not in sent.batches]
    if never_sent:
        verdict.problems.append(f"{len(never_sent)} stored batches k6 never sent: {never_sent[:3]}")
    lost = partial = leaked = 0
    for batch, (size, outcome) in sent.batches.items():
        have = stored_per_batch.get(batch, 0)
        if outcome == "accepted" and have != size:
            lost += size - have
        elif outcome in ("shed", "refused") and have:
            leaked += have
        elif outcome == "unknown" and have not in (0, size):
            partial += 1
    if lost:
        verdict.problems.append(f"{lost} events answered 202 are not stored (lost)")
    if leaked:
        verdict.problems.append(f"{leaked} events of refused/shed batches were stored")
    if partial:
        verdict.problems.append(f"{partial} batches with unknown outcome were stored partially")


def check_summaries(
    base_url: str, docs: list[dict[str, Any]], verdict: Verdict, timeout: float
) -> None:
    """Each account's summary must equal the raw figures; cached answers may lag
    a few seconds, so poll each account until it agrees or the deadline passes."""
    by_account: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_account.setdefault(doc["account_id"], []).append(doc)
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base_url, timeout=SUMMARY_TIMEOUT) as client:
        for account, account_docs in sorted(by_account.items()):
            trouble = "no answer before the deadline"
            while time.monotonic() < deadline:
                body, trouble = _summary(client, account)
                if body is not None:
                    expected = figures_from(
                        account_docs, parse_iso(body["from"]), parse_iso(body["to"]), SUMMARY_TOP
                    )
                    if summary_figures(body) == expected:
                        verdict.summaries_checked += 1
                        break
                    trouble = f"{summary_figures(body)} != {expected}"
                time.sleep(0.5)
            else:
                verdict.problems.append(f"/summary/{account} disagrees: {trouble}")


def _summary(client: httpx.Client, account: str) -> tuple[dict[str, Any] | None, str]:
    """The summary, or why there is none yet (busy server: 503 or a timeout)."""
    try:
        reply = client.get(
            f"/summary/{account}", params={"window": SUMMARY_WINDOW, "top": SUMMARY_TOP}
        )
    except httpx.TimeoutException as exc:
        return None, f"timed out: {exc}"
    if reply.status_code != 200:
        return None, f"HTTP {reply.status_code}: {reply.text[:200]}"
    return reply.json(), ""


def verify(
    k6_json: Path, run_id: str, mongo_url: str, db: str, base_url: str, timeout: float = 600
) -> Verdict:
    sent = read_k6_output(k6_json)
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_url, tz_aware=True)
    try:
        docs = list(stored_events(client[db]["events"], run_id))
    finally:
        client.close()
    verdict = Verdict(sent=sent, stored=len(docs))
    if not sent.batches:
        verdict.problems.append("k6 recorded no batches (no batch_outcome samples)")
    check_storage(sent, docs, verdict)
    check_summaries(base_url, docs, verdict, timeout)
    return verdict


def describe(verdict: Verdict) -> str:
    sent = verdict.sent
    lines = [
        f"batches: {len(sent.batches)} sent, {sent.count('accepted')} accepted (202), "
        f"{sent.count('shed')} shed (429/503), {sent.count('refused')} refused, "
        f"{sent.count('unknown')} unknown",
        f"events: {sent.events('accepted')} accepted, {verdict.stored} stored, "
        f"{sent.events('shed')} shed",
        f"summaries equal to raw figures: {verdict.summaries_checked} accounts",
    ]
    if verdict.ok:
        lines.append("verdict: OK, every accepted event stored exactly once, nothing else")
    else:
        lines.extend(f"PROBLEM: {problem}" for problem in verdict.problems)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.k6_verify", description=__doc__)
    parser.add_argument("--k6-json", type=Path, required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--mongo-url", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--base-url", required=True)
    args = parser.parse_args(argv)
    verdict = verify(args.k6_json, args.run_id, args.mongo_url, args.db, args.base_url)
    print(describe(verdict))
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
