"""MongoDB: the raw events collection, its indexes, and idempotent writes.

Works the same on FerretDB v1 (SQLite) and a real MongoDB 7: no TTL index is
assumed (FerretDB v1 answers NotImplemented), so retention falls back to a
periodic delete when the server refuses one.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure

from service.config import Settings

log = logging.getLogger(__name__)

EVENTS = "events"
# The same raw events, kept only for RECENT_KEEP after ingestion: the live tail
# of /summary and the rollup job's "what arrived since W" read this small
# collection instead of scanning all raw events (FerretDB v1 uses no
# secondary index, so every non-_id query scans its whole collection).
RECENT = "events_recent"
RECENT_KEEP = timedelta(minutes=15)
# events_recent is complete only for events ingested since the flusher began
# copying (RECENT_COPY): readers check this marker before trusting it
STATE = "service_state"
RECENT_MARKER = "recent_copy"
DUPLICATE_KEY = 11000
NOT_IMPLEMENTED = 238

Document = dict[str, Any]


def connect(settings: Settings, timeout_seconds: float | None = None) -> AsyncMongoClient[Document]:
    """A client whose every operation ends within ``timeout_seconds``.

    The default is the flusher's write timeout (MONGO_TIMEOUT_MS), which the
    rollup safety lag must exceed; readers that scan more pass a longer one.
    """
    timeout_ms = int(timeout_seconds * 1000) if timeout_seconds else settings.mongo_timeout_ms
    return AsyncMongoClient(
        settings.mongo_url,
        tz_aware=True,
        serverSelectionTimeoutMS=settings.mongo_timeout_ms,
        connectTimeoutMS=settings.mongo_timeout_ms,
        timeoutMS=timeout_ms,
    )


def database(client: AsyncMongoClient[Document], settings: Settings) -> AsyncDatabase[Document]:
    return client[settings.mongo_db]


def events(db: AsyncDatabase[Document]) -> AsyncCollection[Document]:
    return db[EVENTS]


def recent(db: AsyncDatabase[Document]) -> AsyncCollection[Document]:
    return db[RECENT]


def recent_covers(since: datetime | None, now: datetime, copy_since: datetime | None) -> bool:
    """Whether ``events_recent`` holds every event ingested after ``since``."""
    return (
        since is not None
        and copy_since is not None
        and since >= copy_since
        and since > now - RECENT_KEEP + timedelta(minutes=1)
    )


async def recent_copy_since(db: AsyncDatabase[Document]) -> datetime | None:
    marker = await db[STATE].find_one({"_id": RECENT_MARKER})
    return marker["since"] if marker else None


async def mark_recent_copy(db: AsyncDatabase[Document], on: bool, now: datetime) -> None:
    """Record that copying began (kept if it already had), or that it is off."""
    if not on:
        await db[STATE].delete_one({"_id": RECENT_MARKER})
        return
    with contextlib.suppress(DuplicateKeyError):  # copying since earlier: keep that start
        await db[STATE].insert_one({"_id": RECENT_MARKER, "since": now})


async def ensure_event_indexes(db: AsyncDatabase[Document], settings: Settings) -> bool:
    """Create the raw-event indexes; returns whether a TTL index does retention.

    The dedupe key is ``_id`` (``account_id|event_id``), unique by definition.
    """
    await recent(db).create_index([("ingested_at", ASCENDING)])
    await recent(db).create_index([("account_id", ASCENDING), ("timestamp", ASCENDING)])
    coll = events(db)
    await coll.create_index([("account_id", ASCENDING), ("timestamp", ASCENDING)])
    await coll.create_index([("account_id", ASCENDING), ("minute", ASCENDING)])
    await coll.create_index([("ingested_at", ASCENDING)])
    try:
        await coll.create_index(
            [("timestamp", ASCENDING)],
            expireAfterSeconds=int(timedelta(days=settings.raw_retention_days).total_seconds()),
            name="timestamp_ttl",
        )
        return True
    except OperationFailure as exc:
        if exc.code != NOT_IMPLEMENTED:
            raise
        log.info("server has no TTL indexes; raw retention runs as a periodic delete")
        await coll.create_index([("timestamp", ASCENDING)])
        return False


async def insert_events(coll: AsyncCollection[Document], docs: list[Document]) -> int:
    """Insert, treating 'already there' as success; returns how many were new.

    Any write error other than a duplicate key is re-raised.
    """
    if not docs:
        return 0
    try:
        result = await coll.insert_many(docs, ordered=False)
        return len(result.inserted_ids)
    except BulkWriteError as exc:
        details = exc.details
        others = [e for e in details.get("writeErrors", []) if e.get("code") != DUPLICATE_KEY]
        if others or details.get("writeConcernErrors"):
            raise
        return int(details.get("nInserted", 0))


async def prune_recent(db: AsyncDatabase[Document], now: datetime) -> int:
    result = await recent(db).delete_many({"ingested_at": {"$lt": now - RECENT_KEEP}})
    return result.deleted_count


async def delete_expired_events(coll: AsyncCollection[Document], before: datetime) -> int:
    result = await coll.delete_many({"timestamp": {"$lt": before}})
    return result.deleted_count
