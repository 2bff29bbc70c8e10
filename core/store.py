"""MongoDB: connection, the raw events collection, indexes, duplicate-tolerant writes.

Plain MongoDB, so a real MongoDB 7 works unchanged; every query the service
runs on a hot path is an equality on one indexed top-level field, the only
kind FerretDB v1.24 on PostgreSQL pushes down to an index (the stack's
``scripts/ferretdb/postgresql-setup.sql`` turns the indexes created here into
ones it can use). FerretDB has no TTL indexes, so raw-event retention falls
back to deleting whole expired hours by equality.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pymongo import ASCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    NetworkTimeout,
    OperationFailure,
    ServerSelectionTimeoutError,
    WTimeoutError,
)

from core import keys
from core.settings import Settings

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
NOT_IMPLEMENTED = 238
INDEX_OPTIONS_CONFLICT = 85
TTL_INDEX = "timestamp_ttl"

Document = dict[str, Any]
Database = AsyncDatabase[Document]
Collection = AsyncCollection[Document]
T = TypeVar("T")

TRANSIENT = (
    AutoReconnect,
    ConnectionFailure,
    ExecutionTimeout,
    NetworkTimeout,
    ServerSelectionTimeoutError,
    WTimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying: the server was unreachable, slow, or said so."""
    labels = getattr(exc, "has_error_label", None)
    if labels and (labels("RetryableWriteError") or labels("TransientTransactionError")):
        return True
    return isinstance(exc, TRANSIENT)


def connect(settings: Settings, timeout_seconds: float | None = None) -> AsyncMongoClient[Document]:
    """A client whose every operation ends within ``timeout_seconds`` (MONGO_TIMEOUT_MS)."""
    timeout_ms = int(timeout_seconds * 1000) if timeout_seconds else settings.mongo_timeout_ms
    return AsyncMongoClient(
        settings.mongo_url,
        tz_aware=True,
        serverSelectionTimeoutMS=settings.mongo_timeout_ms,
        connectTimeoutMS=settings.mongo_timeout_ms,
        timeoutMS=timeout_ms,
    )


def database(client: AsyncMongoClient[Document], settings: Settings) -> Database:
    return client[settings.mongo_db]


def events(db: Database) -> Collection:
    return db[keys.EVENTS]


async def ensure_event_indexes(db: Database, settings: Settings) -> bool:
    """Create the raw-event indexes; returns whether a TTL index does retention.

    The dedupe key is ``_id`` (``account_id|event_id``). ``batch`` finds the
    events a stream entry stored (a redelivered entry is recounted from them),
    ``hour`` serves retention and the backfill's recount.
    """
    coll = events(db)
    await coll.create_index([("batch", ASCENDING)])
    await coll.create_index([("hour", ASCENDING)])
    ttl = int(timedelta(days=settings.raw_retention_days).total_seconds())
    try:
        await coll.create_index([("timestamp", ASCENDING)], expireAfterSeconds=ttl, name=TTL_INDEX)
        return True
    except OperationFailure as exc:
        if exc.code == INDEX_OPTIONS_CONFLICT:
            # the retention changed: update the TTL in place
            index = {"name": TTL_INDEX, "expireAfterSeconds": ttl}
            await db.command("collMod", keys.EVENTS, index=index)
            log.info("raw retention TTL changed to %d s", ttl)
            return True
        if exc.code != NOT_IMPLEMENTED:
            raise
        log.info("the server has no TTL indexes; raw retention deletes expired hours")
        return False


async def insert_new(coll: Collection, docs: list[Document]) -> set[int]:
    """Insert, treating 'already there' as success; returns the indexes that were new.

    Any write error other than a duplicate key is re-raised.
    """
    if not docs:
        return set()
    try:
        await coll.insert_many(docs, ordered=False)
        return set(range(len(docs)))
    except BulkWriteError as exc:
        details = exc.details
        errors = details.get("writeErrors", [])
        if details.get("writeConcernErrors") or any(e.get("code") != DUPLICATE_KEY for e in errors):
            raise
        duplicates = {int(e["index"]) for e in errors}
        return {i for i in range(len(docs)) if i not in duplicates}


async def retry_duplicate_key(action: Callable[[], Awaitable[T]], attempts: int = 5) -> T:
    """Run an upsert again when the server refused it with E11000 under a race.

    Two upserts of a missing ``_id`` can both miss and both insert; MongoDB
    retries the loser itself, FerretDB answers E11000. Either way the second
    attempt finds the document and updates it.
    """
    for attempt in range(attempts):
        try:
            return await action()
        except DuplicateKeyError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


async def delete_expired_hour(db: Database, hour: datetime) -> int:
    """Delete the raw events of one whole hour (equality on ``hour``: indexed)."""
    result = await events(db).delete_many({"hour": hour})
    return result.deleted_count
