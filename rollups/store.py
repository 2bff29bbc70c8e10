"""MongoDB access for rollups: versioned buckets, user chunks, the watermark, retention.

Buckets are written insert-only: a recompute that changes a bucket inserts a
new version (chunks first, then the bucket) and then prunes older versions;
readers take the newest version of each bucket. So a recompute never
increments anything, a reader never sees a half-written bucket, and a slow or
overlapping writer can never move a bucket backwards. (Insert-only also keeps
clear of FerretDB v1's update path, which wedges on a bulk update of more
than ~100 statements; see docs/OPERATIONS.md.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from rollups.buckets import (
    Counts,
    Document,
    Resolution,
    bucket_key,
    from_documents,
    newest_versions,
    to_documents,
)

STATE = "rollup_state"
WATERMARK_ID = "watermark"
DUPLICATE_KEY = 11000


def buckets(db: AsyncDatabase[Document], resolution: Resolution) -> AsyncCollection[Document]:
    return db[f"rollups_{resolution}"]


def chunks(db: AsyncDatabase[Document], resolution: Resolution) -> AsyncCollection[Document]:
    return db[f"rollups_{resolution}_users"]


RESOLUTIONS: tuple[Resolution, ...] = ("minute", "hour")


async def ensure_indexes(db: AsyncDatabase[Document]) -> None:
    for res in RESOLUTIONS:
        await buckets(db, res).create_index([("account_id", ASCENDING), ("start", ASCENDING)])
        await buckets(db, res).create_index([("key", ASCENDING)])
        await buckets(db, res).create_index([("start", ASCENDING)])
        await chunks(db, res).create_index([("version", ASCENDING)])
        await chunks(db, res).create_index([("key", ASCENDING)])
        await chunks(db, res).create_index([("start", ASCENDING)])


async def read_watermark(db: AsyncDatabase[Document]) -> datetime | None:
    doc = await db[STATE].find_one({"_id": WATERMARK_ID})
    return doc["value"] if doc else None


async def write_watermark(db: AsyncDatabase[Document], value: datetime) -> None:
    # $max: a slow or duplicate writer can never move it backwards
    await db[STATE].update_one({"_id": WATERMARK_ID}, {"$max": {"value": value}}, upsert=True)


@dataclass
class WriteResult:
    written: int = 0
    deleted: int = 0
    unchanged: int = 0


async def write_buckets(
    db: AsyncDatabase[Document],
    resolution: Resolution,
    account_id: str,
    computed: Iterable[tuple[datetime, Counts]],
    watermark: datetime,
    dry_run: bool = False,
) -> WriteResult:
    """Store the buckets whose counts changed; zero counts empty a bucket."""
    computed = list(computed)
    result = WriteResult()
    if not computed:
        return result
    keys = [bucket_key(account_id, start) for start, _ in computed]
    current = await _current(db, resolution, keys)
    rev = datetime.now(UTC)
    bucket_docs: list[Document] = []
    chunk_docs: list[Document] = []
    for (start, counts), key in zip(computed, keys, strict=True):
        existing = current.get(key)
        if _same(existing, counts):
            result.unchanged += 1
            continue
        if counts.total:
            result.written += 1
        else:
            result.deleted += 1  # a tombstone version: the bucket reads as empty
        bucket, extra = to_documents(account_id, start, counts, watermark, rev)
        bucket_docs.append(bucket)
        chunk_docs.extend(extra)
    if dry_run or not bucket_docs:
        return result
    await _insert(chunks(db, resolution), chunk_docs)
    await _insert(buckets(db, resolution), bucket_docs)
    await _prune(db, resolution, [b["key"] for b in bucket_docs], watermark, rev)
    return result


def _same(existing: tuple[Document, Counts] | None, counts: Counts) -> bool:
    if existing is None:
        return counts.total == 0
    old = existing[1]
    return (old.total, old.types, old.users) == (counts.total, counts.types, counts.users)


async def _insert(coll: AsyncCollection[Document], docs: list[Document]) -> None:
    if not docs:
        return
    try:
        await coll.insert_many(docs, ordered=False)
    except BulkWriteError as exc:  # a retried write of the same version is fine
        if any(e.get("code") != DUPLICATE_KEY for e in exc.details.get("writeErrors", [])):
            raise


async def _prune(
    db: AsyncDatabase[Document],
    resolution: Resolution,
    keys: list[str],
    watermark: datetime,
    rev: datetime,
) -> None:
    older: dict[str, Any] = {
        "key": {"$in": keys},
        "$or": [{"w": {"$lt": watermark}}, {"w": watermark, "rev": {"$lt": rev}}],
    }
    stale = [d["_id"] async for d in buckets(db, resolution).find(older, {"_id": 1})]
    if stale:
        await chunks(db, resolution).delete_many({"version": {"$in": stale}})
        await buckets(db, resolution).delete_many({"_id": {"$in": stale}})


async def _with_chunks(
    db: AsyncDatabase[Document], resolution: Resolution, docs: list[Document]
) -> list[tuple[Document, Counts]]:
    versions = newest_versions(docs)
    spilled = [d["_id"] for d in versions if d.get("user_chunks")]
    extra: dict[str, list[Document]] = {}
    if spilled:
        async for chunk in chunks(db, resolution).find({"version": {"$in": spilled}}):
            extra.setdefault(chunk["version"], []).append(chunk)
    return [(d, from_documents(d, extra.get(d["_id"], ()))) for d in versions]


async def _current(
    db: AsyncDatabase[Document], resolution: Resolution, keys: list[str]
) -> dict[str, tuple[Document, Counts]]:
    docs = await buckets(db, resolution).find({"key": {"$in": keys}}).to_list(None)
    return {d["key"]: (d, c) for d, c in await _with_chunks(db, resolution, docs)}


@dataclass
class BucketRead:
    buckets: list[tuple[Document, Counts]]
    documents: int  # bucket documents fetched (all versions), chunks not included


async def read_buckets(
    db: AsyncDatabase[Document],
    resolution: Resolution,
    account_id: str,
    start: datetime,
    end: datetime,
) -> BucketRead:
    """Current bucket versions with start in [start, end), with their counts."""
    if start >= end:
        return BucketRead([], 0)
    query = {"account_id": account_id, "start": {"$gte": start, "$lt": end}}
    docs = await buckets(db, resolution).find(query).to_list(None)
    return BucketRead(await _with_chunks(db, resolution, docs), len(docs))


async def delete_older_than(
    db: AsyncDatabase[Document], resolution: Resolution, cutoff: datetime
) -> int:
    await chunks(db, resolution).delete_many({"start": {"$lt": cutoff}})
    result = await buckets(db, resolution).delete_many({"start": {"$lt": cutoff}})
    return result.deleted_count
