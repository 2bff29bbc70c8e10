"""Ground truth for summaries, computed straight from raw events, and raw-event seeding."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pymongo

from rollups.buckets import top_users
from service.events import Event, to_document


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def ground_truth(
    events: pymongo.collection.Collection[dict[str, Any]],
    account: str,
    start: datetime,
    end: datetime,
    top: int,
) -> dict[str, Any]:
    """The figures /summary must report, counted from every stored raw event."""
    types: Counter[str] = Counter()
    users: Counter[str] = Counter()
    query = {"account_id": account, "timestamp": {"$gte": start, "$lt": end}}
    for doc in events.find(query, {"type": 1, "user_id": 1}):
        types[doc["type"]] += 1
        users[doc["user_id"]] += 1
    return {
        "total": sum(types.values()),
        "totals": dict(sorted(types.items())),
        "unique_users": len(users),
        "top_users": top_users(users, top),
    }


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in ("total", "totals", "unique_users", "top_users")}


def raw_document(
    account: str, event_id: str, user: str, type_: str, ts: datetime, ingested_at: datetime
) -> dict[str, Any]:
    event = Event(event_id=event_id, account_id=account, user_id=user, type=type_, timestamp=ts)
    return to_document(event, ingested_at.astimezone(UTC))
