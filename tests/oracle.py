"""Ground truth for summaries, counted straight from the raw events in MongoDB.

Written independently of the service's code (no shared helpers), so a bug in
the service's counting or tie-breaking cannot also hide here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pymongo


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def ground_truth(
    events: pymongo.collection.Collection[dict[str, Any]],
    account: str,
    start: datetime,
    end: datetime,
    top: int,
) -> dict[str, Any]:
    """What /summary must say for [start, end), from every stored event of the account."""
    total = 0
    per_type: dict[str, int] = {}
    per_user: dict[str, int] = {}
    for doc in events.find({"account_id": account}, {"type": 1, "user_id": 1, "timestamp": 1}):
        if not start <= doc["timestamp"] < end:
            continue
        total += 1
        per_type[doc["type"]] = per_type.get(doc["type"], 0) + 1
        per_user[doc["user_id"]] = per_user.get(doc["user_id"], 0) + 1
    ranked = sorted(per_user, key=lambda user: (-per_user[user], user))
    return {
        "total": total,
        "totals": dict(sorted(per_type.items())),
        "unique_users": len(per_user),
        "top_users": [{"user_id": u, "events": per_user[u]} for u in ranked[:top]],
    }


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The parts of a /summary answer the ground truth speaks about."""
    return {k: summary[k] for k in ("total", "totals", "unique_users", "top_users")}
