"""Ground truth for summaries, computed straight from raw events, and raw-event seeding."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pymongo

from scripts.k6_verify import figures_from, parse_iso
from scripts.k6_verify import summary_figures as figures
from service.events import Event, to_document

__all__ = ["figures", "ground_truth", "parse_iso", "raw_document"]


def ground_truth(
    events: pymongo.collection.Collection[dict[str, Any]],
    account: str,
    start: datetime,
    end: datetime,
    top: int,
) -> dict[str, Any]:
    """The figures /summary must report, counted from every stored raw event."""
    query = {"account_id": account, "timestamp": {"$gte": start, "$lt": end}}
    docs = events.find(query, {"type": 1, "user_id": 1, "timestamp": 1})
    return figures_from(docs, start, end, top)


def raw_document(
    account: str, event_id: str, user: str, type_: str, ts: datetime, ingested_at: datetime
) -> dict[str, Any]:
    event = Event(event_id=event_id, account_id=account, user_id=user, type=type_, timestamp=ts)
    return to_document(event, ingested_at.astimezone(UTC))
