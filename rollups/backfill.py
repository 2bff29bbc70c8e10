"""Backfill: recompute every bucket of a time range from raw events.

Works hour by hour (a whole hour's minute buckets, then its hour bucket),
checkpointing after each, so an interrupted run resumes where it stopped.
It refuses any range whose raw events may already have expired: recomputing
there would replace good buckets with partial counts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from rollups import store as rollup_store
from rollups.buckets import HOUR, Counts, Document, Resolution, floor, starts
from rollups.jobs import count_raw, raw_horizon
from service.config import Settings

CHECKPOINTS = "rollup_backfills"


class RangeRefused(ValueError):
    """The range reaches back past what raw retention guarantees."""


@dataclass
class Report:
    hours_total: int
    hours_done: int = 0
    hours_skipped: int = 0
    events: int = 0
    written: int = 0
    deleted: int = 0
    unchanged: int = 0


def check_range(settings: Settings, start: datetime, end: datetime, now: datetime) -> None:
    if end <= start:
        raise RangeRefused("--to must be after --from")
    horizon = raw_horizon(settings, now)
    if floor(start, "hour") < horizon:
        earliest = floor(horizon, "hour") + HOUR
        raise RangeRefused(
            f"refusing to backfill from {start.isoformat()}: raw events older than "
            f"{horizon.isoformat(timespec='minutes')} (raw retention "
            f"{settings.raw_retention_days} days minus a safety margin) may already have "
            "expired, and recomputing from them would overwrite good buckets with partial "
            f"counts. The earliest safe --from is {earliest.isoformat()}."
        )


def checkpoint_id(start: datetime, end: datetime, account: str | None) -> str:
    return f"{start.isoformat()}|{end.isoformat()}|{account or '*'}"


async def backfill(
    db: AsyncDatabase[Document],
    settings: Settings,
    start: datetime,
    end: datetime,
    account: str | None = None,
    dry_run: bool = False,
    progress: Callable[[Report], None] = lambda _: None,
    now: datetime | None = None,
) -> Report:
    now = now or datetime.now(UTC)
    check_range(settings, start, end, now)
    watermark = await rollup_store.read_watermark(db) or now - timedelta(
        seconds=settings.rollup_safety_lag_seconds
    )
    hours = list(starts(floor(start, "hour"), end, "hour"))
    report = Report(hours_total=len(hours))
    cp_id = checkpoint_id(start, end, account)
    checkpoint = await db[CHECKPOINTS].find_one({"_id": cp_id})
    done_through = checkpoint["done_through"] if checkpoint and not dry_run else None
    for hour in hours:
        if done_through is not None and hour <= done_through:
            report.hours_skipped += 1
            report.hours_done += 1
            progress(report)
            continue
        await _backfill_hour(db, hour, account, watermark, dry_run, report)
        if not dry_run:
            await db[CHECKPOINTS].update_one(
                {"_id": cp_id}, {"$set": {"done_through": hour}}, upsert=True
            )
        report.hours_done += 1
        progress(report)
    if not dry_run:
        await db[CHECKPOINTS].delete_one({"_id": cp_id})
    return report


async def _backfill_hour(
    db: AsyncDatabase[Document],
    hour: datetime,
    account: str | None,
    watermark: datetime,
    dry_run: bool,
    report: Report,
) -> None:
    match: dict[str, Any] = {"timestamp": {"$gte": hour, "$lt": hour + HOUR}}
    if account:
        match["account_id"] = account
    raw = await count_raw(db, match, watermark, "minute")
    report.events += sum(c.total for c in raw.values())
    per_account: dict[str, dict[datetime, Counts]] = defaultdict(dict)
    for (acct, minute), counts in raw.items():
        per_account[acct][minute] = counts
    existing = await _existing_starts(db, hour, account)
    for acct, minute_starts in existing.items():
        for minute in minute_starts:
            per_account[acct].setdefault(minute, Counts())  # now empty: delete it
    for acct, minutes in per_account.items():
        hour_total = Counts()
        for counts in minutes.values():
            hour_total.merge(counts)
        await _apply(db, "minute", acct, sorted(minutes.items()), watermark, dry_run, report)
        await _apply(db, "hour", acct, [(hour, hour_total)], watermark, dry_run, report)


async def _existing_starts(
    db: AsyncDatabase[Document], hour: datetime, account: str | None
) -> dict[str, list[datetime]]:
    query: dict[str, Any] = {"start": {"$gte": hour, "$lt": hour + HOUR}}
    if account:
        query["account_id"] = account
    found: dict[str, list[datetime]] = defaultdict(list)
    projection = {"_id": 0, "account_id": 1, "start": 1}
    async for doc in rollup_store.buckets(db, "minute").find(query, projection):
        found[doc["account_id"]].append(doc["start"])
    return found


async def _apply(
    db: AsyncDatabase[Document],
    resolution: Resolution,
    account: str,
    computed: list[tuple[datetime, Counts]],
    watermark: datetime,
    dry_run: bool,
    report: Report,
) -> None:
    """Write only what differs; a re-run over a finished range touches nothing."""
    result = await rollup_store.write_buckets(
        db, resolution, account, computed, watermark, dry_run=dry_run
    )
    report.written += result.written
    report.deleted += result.deleted
    report.unchanged += result.unchanged
