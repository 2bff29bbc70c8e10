"""MongoDB access for rollups: bucket and chunk collections, the watermark, retention.

Writes are whole-document replacements (never ``$inc``), so recomputing a
bucket any number of times leaves the same document.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from pymongo import ASCENDING, ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

from rollups.buckets import Counts, Document, Resolution, from_documents, to_documents

STATE = "rollup_state"
WATERMARK_ID = "watermark"


def buckets(db: AsyncDatabase[Document], resolution: Resolution) -> AsyncCollection[Document]:
    return db[f"rollups_{resolution}"]


def chunks(db: AsyncDatabase[Document], resolution: Resolution) -> AsyncCollection[Document]:
    return db[f"rollups_{resolution}_users"]


async def ensure_indexes(db: AsyncDatabase[Document]) -> None:
    for resolution in ("minute", "hour"):
        res: Resolution = resolution
        await buckets(db, res).create_index([("account_id", ASCENDING), ("start", ASCENDING)])
        await buckets(db, res).create_index([("start", ASCENDING)])
        await chunks(db, res).create_index([("bucket", ASCENDING)])
        await chunks(db, res).create_index([("start", ASCENDING)])


async def read_watermark(db: AsyncDatabase[Document]) -> datetime | None:
    doc = await db[STATE].find_one({"_id": WATERMARK_ID})
    return doc["value"] if doc else None


async def write_watermark(db: AsyncDatabase[Document], value: datetime) -> None:
    # $max: a slow or duplicate writer can never move it backwards
    await db[STATE].update_one({"_id": WATERMARK_ID}, {"$max": {"value": value}}, upsert=True)


async def write_buckets(
    db: AsyncDatabase[Document],
    resolution: Resolution,
    account_id: str,
    computed: Iterable[tuple[datetime, Counts]],
    watermark: datetime,
) -> tuple[int, int]:
    """Replace the buckets (delete empty ones); returns (written, deleted).

    Chunk documents carry the version (``v``) of the bucket they belong to and
    are written before the bucket and pruned after it, so a concurrent reader
    always finds exactly the chunks of the bucket version it read.
    """
    version = watermark.isoformat()
    bucket_docs: list[Document] = []
    chunk_ops: list[ReplaceOne[Document]] = []
    empty: list[str] = []
    written: list[str] = []
    for start, counts in computed:
        bucket, extra = to_documents(resolution, account_id, start, counts, watermark)
        if counts.total == 0:
            empty.append(bucket["_id"])
            continue
        bucket["chunk_v"] = version
        written.append(bucket["_id"])
        bucket_docs.append(bucket)
        for chunk in extra:
            chunk["v"] = version
            chunk["_id"] = f"{chunk['_id']}|{version}"
            chunk_ops.append(ReplaceOne({"_id": chunk["_id"]}, chunk, upsert=True))
    if chunk_ops:
        await chunks(db, resolution).bulk_write(chunk_ops, ordered=False)
    if bucket_docs:
        await _replace_unless_newer(buckets(db, resolution), bucket_docs, watermark)
        await chunks(db, resolution).delete_many(
            {"bucket": {"$in": written}, "v": {"$ne": version}}
        )
    deleted = 0
    if empty:
        result = await buckets(db, resolution).delete_many(
            {"_id": {"$in": empty}, "w": {"$lte": watermark}}
        )
        deleted = result.deleted_count
        await chunks(db, resolution).delete_many({"bucket": {"$in": empty}})
    return len(bucket_docs), deleted


async def _replace_unless_newer(
    coll: AsyncCollection[Document], docs: list[Document], watermark: datetime
) -> None:
    """Upserts that only replace an older (or equal) version of each bucket.

    A newer bucket makes the guarded upsert a duplicate key, i.e. a no-op, so a
    slow or overlapping writer can never move a bucket backwards.
    """
    guards = [{"_id": doc["_id"], "w": {"$lte": watermark}} for doc in docs]
    try:
        ops = [ReplaceOne(g, d, upsert=True) for g, d in zip(guards, docs, strict=True)]
        await coll.bulk_write(ops, ordered=False)
        return
    except (BulkWriteError, KeyError):
        pass  # FerretDB's bulk reply to a refused upsert trips pymongo (KeyError)
    for guard, doc in zip(guards, docs, strict=True):
        try:
            await coll.replace_one(guard, doc, upsert=True)
        except DuplicateKeyError:
            continue


async def read_buckets(
    db: AsyncDatabase[Document],
    resolution: Resolution,
    account_id: str,
    start: datetime,
    end: datetime,
) -> list[tuple[Document, Counts]]:
    """Buckets with start in [start, end), with their counts (chunks included)."""
    if start >= end:
        return []
    query = {"account_id": account_id, "start": {"$gte": start, "$lt": end}}
    docs = await buckets(db, resolution).find(query).to_list(None)
    spilled = {d["_id"]: d.get("chunk_v") for d in docs if d.get("user_chunks")}
    extra: dict[str, list[Document]] = {}
    if spilled:
        async for chunk in chunks(db, resolution).find({"bucket": {"$in": list(spilled)}}):
            if chunk.get("v") == spilled[chunk["bucket"]]:
                extra.setdefault(chunk["bucket"], []).append(chunk)
    return [(d, from_documents(d, extra.get(d["_id"], ()))) for d in docs]


async def delete_older_than(
    db: AsyncDatabase[Document], resolution: Resolution, cutoff: datetime
) -> int:
    await chunks(db, resolution).delete_many({"start": {"$lt": cutoff}})
    result = await buckets(db, resolution).delete_many({"start": {"$lt": cutoff}})
    return result.deleted_count
