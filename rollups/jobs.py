"""Rollup computation: recompute the buckets that new raw events touched.

Each run advances the watermark W to ``now - safety lag`` (the lag exceeds the
flusher's write timeout, so every event stamped ``ingested_at <= W`` is
visible by then), finds the (account, minute) pairs that received events with
``ingested_at`` in (W_prev, W], recomputes those minute buckets from raw
events with ``ingested_at <= W``, then their hour buckets, and only then
publishes W. A crash anywhere means the next run redoes the same work; a
bucket is always replaced whole, never incremented.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from rollups import store as rollup_store
from rollups.buckets import HOUR, Counts, Document, floor
from service import store
from service.config import Settings
from service.store import events as events_collection

log = logging.getLogger("rollups.jobs")

# raw events younger than retention minus this margin are surely all still there
RAW_SAFETY_MARGIN = timedelta(hours=2)
# minute buckets younger than their retention minus this are complete for an hour
MINUTE_SAFETY_MARGIN = timedelta(hours=2)
ACCOUNTS_PER_READ = 50


@dataclass
class RunResult:
    watermark: datetime
    previous: datetime | None
    minute_buckets: int = 0
    hour_buckets: int = 0
    skipped_expired: int = 0


def to_millis(ts: datetime) -> datetime:
    """MongoDB keeps milliseconds; a watermark must compare equal after a round trip."""
    return ts.replace(microsecond=ts.microsecond // 1000 * 1000)


def raw_horizon(settings: Settings, now: datetime) -> datetime:
    """Buckets starting before this may have lost raw events to retention."""
    return now - timedelta(days=settings.raw_retention_days) + RAW_SAFETY_MARGIN


def minute_horizon(settings: Settings, now: datetime) -> datetime:
    """Hours starting at or after this can be summed from their minute buckets."""
    return now - timedelta(hours=settings.minute_retention_hours) + MINUTE_SAFETY_MARGIN


async def affected_minutes(
    db: AsyncDatabase[Document], since: datetime | None, until: datetime, now: datetime
) -> dict[str, set[datetime]]:
    """(account -> minutes) that received events with ingested_at in (since, until]."""
    copy_since = await store.recent_copy_since(db)
    source = store.recent(db) if store.recent_covers(since, now, copy_since) else store.events(db)
    window: dict[str, Any] = {"$lte": until}
    if since is not None:
        window["$gt"] = since
    # rows + a set in Python: FerretDB v1 runs $group at ~1 ms per document,
    # a plain find at ~35 µs (scripts/bench_rollups.py)
    found: dict[str, set[datetime]] = defaultdict(set)
    projection = {"_id": 0, "account_id": 1, "minute": 1}
    async for doc in source.find({"ingested_at": window}, projection, batch_size=10_000):
        found[doc["account_id"]].add(doc["minute"])
    return found


async def count_raw(
    db: AsyncDatabase[Document],
    match: dict[str, Any],
    watermark: datetime,
    key: str,
) -> dict[tuple[str, datetime], Counts]:
    """Counts per (account, ``key`` field) of raw events matching, ingested by W.

    Reads (account, key, type, user) rows and counts in Python: on FerretDB
    this measured faster than a $group on (type, user) (scripts/bench_rollups.py).
    """
    query = {**match, "ingested_at": {"$lte": watermark}}
    projection = {"_id": 0, "account_id": 1, key: 1, "type": 1, "user_id": 1}
    counts: dict[tuple[str, datetime], Counts] = defaultdict(Counts)
    async for doc in events_collection(db).find(query, projection, batch_size=10_000):
        counts[(doc["account_id"], doc[key])].add_event(doc["type"], doc["user_id"])
    return counts


async def recompute_minutes(
    db: AsyncDatabase[Document], affected: dict[str, list[datetime]], watermark: datetime
) -> int:
    """Recount the given minutes of every account; one raw read per group of accounts.

    One query per account cost one full collection scan each on FerretDB (no
    index use), which left rollups minutes behind after a spike over many
    accounts; an ``$or`` of per-account ranges is one scan there and one index
    range per clause on MongoDB.
    """
    # a range per account, not $in: FerretDB v1 evaluates a long $in per document
    clauses = [
        {"account_id": account, "minute": {"$gte": min(minutes), "$lte": max(minutes)}}
        for account, minutes in sorted(affected.items())
        if minutes
    ]
    counts: dict[tuple[str, datetime], Counts] = {}
    for start in range(0, len(clauses), ACCOUNTS_PER_READ):
        group = clauses[start : start + ACCOUNTS_PER_READ]
        counts.update(await count_raw(db, {"$or": group}, watermark, "minute"))
    changed = 0
    for account, minutes in sorted(affected.items()):
        computed = [(m, counts.get((account, m), Counts())) for m in sorted(minutes)]
        if computed:
            result = await rollup_store.write_buckets(db, "minute", account, computed, watermark)
            changed += result.written + result.deleted
    return changed


async def hour_counts(
    db: AsyncDatabase[Document],
    account: str,
    hour: datetime,
    watermark: datetime,
    settings: Settings,
    now: datetime,
) -> Counts:
    """An hour's counts: summed from minute buckets while they are all kept, else raw."""
    if hour >= minute_horizon(settings, now):
        total = Counts()
        read = await rollup_store.read_buckets(db, "minute", account, hour, hour + HOUR)
        for _, counts in read.buckets:
            total.merge(counts)
        return total
    raw = await count_raw(
        db,
        {"account_id": account, "timestamp": {"$gte": hour, "$lt": hour + HOUR}},
        watermark,
        "hour",
    )
    return raw.get((account, hour), Counts())


async def recompute_hours(
    db: AsyncDatabase[Document],
    account: str,
    hours: set[datetime],
    watermark: datetime,
    settings: Settings,
    now: datetime,
) -> int:
    computed = [
        (h, await hour_counts(db, account, h, watermark, settings, now)) for h in sorted(hours)
    ]
    result = await rollup_store.write_buckets(db, "hour", account, computed, watermark)
    return result.written + result.deleted


async def run_once(
    db: AsyncDatabase[Document], settings: Settings, now: datetime | None = None
) -> RunResult | None:
    """One rollup pass up to ``now - safety lag``; None when W would not advance."""
    now = now or datetime.now(UTC)
    watermark = to_millis(now - timedelta(seconds=settings.rollup_safety_lag_seconds))
    previous = await rollup_store.read_watermark(db)
    if previous is not None and watermark <= previous:
        return None
    result = RunResult(watermark, previous)
    horizon = raw_horizon(settings, now)
    fresh: dict[str, list[datetime]] = {}
    for account, received in (await affected_minutes(db, previous, watermark, now)).items():
        fresh[account] = [m for m in received if m >= horizon]
        result.skipped_expired += len(received) - len(fresh[account])
    result.minute_buckets += await recompute_minutes(db, fresh, watermark)
    for account, minutes in fresh.items():
        hours = {floor(m, "hour") for m in minutes}
        result.hour_buckets += await recompute_hours(db, account, hours, watermark, settings, now)
    if result.skipped_expired:
        log.warning(
            "%d late minutes are older than raw retention minus %s; their buckets are kept",
            result.skipped_expired,
            RAW_SAFETY_MARGIN,
        )
    await rollup_store.write_watermark(db, watermark)
    return result


async def expire_buckets(db: AsyncDatabase[Document], settings: Settings, now: datetime) -> None:
    """Bucket retention where the server has no TTL index (FerretDB v1)."""
    await rollup_store.delete_older_than(
        db, "minute", now - timedelta(hours=settings.minute_retention_hours)
    )
    await rollup_store.delete_older_than(
        db, "hour", now - timedelta(days=settings.hour_retention_days)
    )
