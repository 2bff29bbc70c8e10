"""Rollup documents no head will ever delete: a dead pass's drafts, an idle head's retired.

A rollover writes its new documents first, then swings the account's head to
them (``rollups/rollover.py``). A pass that dies in between (SIGKILL, a timeout)
leaves documents no head names; a rollover deletes what the previous one
superseded (its head's ``retired`` list) only when the account rolls again,
which an idle account never does. This sweep, run with retention under the
rollups lease, removes both:

- **drafts**: every rollover records its documents in ``rollup_drafts`` before
  writing them and removes the record once its head is published (or its
  documents discarded after losing the race). A record older than
  ``ORPHAN_AFTER`` belongs to a dead pass: if the account's current head names
  none of its documents they are deleted, then the record.
- **retired**: each published head that retires documents is scheduled (a Redis
  sorted set) ``RETIRE_AFTER`` later; by then an active account has rolled again
  and its next rollover deleted them (the head is gone: nothing to do); for an
  idle one, whose head is still current, they are deleted here.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from core import keys, metrics
from core.connections import Redis
from core.events import now_utc
from core.rollup_docs import COLLECTIONS, Head, Kind, head_id, read_head
from core.settings import Settings
from core.store import Database, Document

log = logging.getLogger(__name__)

ORPHAN_AFTER = timedelta(minutes=10)  # far longer than any pass (ROLLUP_TIMEOUT_SECONDS)
RETIRE_AFTER_MS = 10 * 60_000  # a reader of the head before it has long finished
MAX_PER_SWEEP = 1000  # bounded work per call; the next sweep goes on


def draft_record(tag: str, head: Head, docs: dict[Kind, list[Document]]) -> Document:
    return {"_id": tag, "account_id": head.account_id, "created_at": now_utc(),
            "docs": [f"{kind} {d['_id']}" for kind, written in docs.items()
                     for d in written]}  # fmt: skip


def named_by(head: Head | None) -> set[str]:
    """The ids of every document ``head`` reads: buckets, windows, index."""
    if head is None:
        return set()
    named = set(head.windows.values())
    for resolution in ("minute", "hour"):
        named.update(head.bucket_doc_id(resolution, s) or "" for s in head.buckets(resolution))
    if head.index:
        named.add(head.index)
    return named


async def schedule_retired(redis: Redis, settings: Settings, head: Head) -> None:
    if head.retired:
        member = head_id(head.account_id, head.version)
        due = time.time() * 1000 + RETIRE_AFTER_MS
        await redis.zadd(keys.rollup_retire(settings), {member: due})


class Sweep:
    def __init__(self, db: Database, redis: Redis, settings: Settings) -> None:
        self.db = db
        self.redis = redis
        self.settings = settings

    async def run(self, now: datetime | None = None) -> tuple[int, int]:
        """(orphaned documents deleted, retired documents deleted)."""
        return await self.drafts(now or now_utc()), await self.retired()

    async def drafts(self, now: datetime) -> int:
        deleted = 0
        stale = self.db[keys.DRAFTS].find({"created_at": {"$lt": now - ORPHAN_AFTER}})
        async for record in stale.limit(MAX_PER_SWEEP):
            # with its bucket index: the buckets it names are listed there, not in the head
            head = await read_head(self.db, record["account_id"], with_index=True)
            named = named_by(head)
            docs = [item.partition(" ") for item in record.get("docs", [])]
            if not any(doc_id in named for _, _, doc_id in docs):
                for kind, _, doc_id in docs:
                    found = await self.db[COLLECTIONS[kind]].delete_one({"_id": doc_id})
                    deleted += found.deleted_count
            await self.db[keys.DRAFTS].delete_one({"_id": record["_id"]})
        if deleted:
            metrics.ROLLUP_ORPHANS_DELETED.labels("draft").inc(deleted)
            log.info("deleted %d rollup documents a dead pass left", deleted)
        return deleted

    async def retired(self) -> int:
        key = keys.rollup_retire(self.settings)
        due: list[bytes] = await self.redis.zrangebyscore(  # type: ignore[assignment]
            key, "-inf", time.time() * 1000, 0, MAX_PER_SWEEP
        )
        deleted = 0
        for member in due:
            found = await self.db[keys.HEADS].find_one({"_id": member.decode()})
            if found is not None:  # still current: the account has not rolled since
                # (a retired list names only documents this head superseded: never its own)
                for kind, doc_id in Head.from_document(found).retired:
                    result = await self.db[COLLECTIONS[kind]].delete_one({"_id": doc_id})
                    deleted += result.deleted_count
            await self.redis.zrem(key, member)
        if deleted:
            metrics.ROLLUP_ORPHANS_DELETED.labels("retired").inc(deleted)
        return deleted
