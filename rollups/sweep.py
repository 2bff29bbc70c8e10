"""Rollup documents no head will ever delete: a dead pass's drafts, an idle head's retired.

A rollover writes its new documents first, then swings the account's head to
them (``rollups/rollover.py``). A pass that dies in between (SIGKILL, a timeout)
leaves documents no head names; what rollovers supersede is deleted in arrears
(**retiring**, below), at an account's later rollover, which an idle account
never has. This sweep, run with retention by the holder of rollup partition 0,
removes both:

- **drafts**: every batch of rollovers records its documents in
  ``rollup_drafts`` before writing them and removes the record once their heads
  are published (or their documents discarded after losing the race). A record
  older than ``ORPHAN_AFTER`` belongs to a dead pass: the documents of each of
  its accounts whose current head names none of them are deleted, then the
  record.
- **retired**: each account that rolls is scheduled (a Redis sorted set per
  rollup partition, one member per account) ``RETIRE_AFTER`` later; by then an
  active account has rolled again and pushed that back; for an idle one, whose
  head is still current, everything it superseded goes here.

**Retiring.** One delete per document costs FerretDB ~20 times an insert, and a
busy account supersedes ~9 documents a minute (six window aggregates, the hour
bucket, the bucket index, the head). So nothing is deleted document by document:
every ``ROLLUP_SWEEP_EVERY`` rollovers of an account, :func:`retire_superseded`
deletes all it superseded with one ``delete_many`` per collection, by the
account (indexed) and what to keep. It is safe whoever runs it, even a process
whose lease lapsed long ago, because every rollup document records the head
version it was written for (``v``) and only documents written for the reference
head or older go: a rollover that can still publish writes for a newer version
(its head follows the current one, compare-and-set), and a document a newer
head names that was written for an older one was named by every head since,
the reference included (documents are never named again once superseded).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from datetime import datetime, timedelta

from core import keys, metrics
from core.buckets import to_datetime
from core.connections import Redis
from core.events import now_utc
from core.rollup_docs import COLLECTIONS, Head, Kind, document_of, kind_and_id, read_head
from core.settings import Settings
from core.store import Database, Document

log = logging.getLogger(__name__)

ORPHAN_AFTER = timedelta(minutes=10)  # far longer than any pass (ROLLUP_TIMEOUT_SECONDS)
RETIRE_AFTER_MS = 10 * 60_000  # a reader of the head before it has long finished
MAX_PER_SWEEP = 1000  # bounded work per call; the next sweep goes on
RETIRED_SECONDS = 20.0  # at most this long retiring idle accounts per call
RETIRING_AT_ONCE = 4
GARBAGE_BYTES = 8 * 1024 * 1024  # superseded this much: retire at the next rollover


def draft_record(tag: str, written: Iterable[dict[Kind, list[Document]]]) -> Document:
    """The record of a batch's documents, kept while they are written (every id begins
    with its account: ``core/rollup_docs.py``), and of their accounts."""
    docs = [f"{kind} {d['_id']}" for those in written for kind, some in those.items()
            for d in some]  # fmt: skip
    accounts = sorted({account_of(item.partition(" ")[2]) for item in docs})
    return {"_id": tag, "created_at": now_utc(), "accounts": accounts, "docs": docs}


def account_of(doc_id: str) -> str:
    """The account of a rollup document's id (account ids hold no ``|``)."""
    return doc_id.partition("|")[0]


async def retire_superseded(db: Database, ref: Head, keep: set[str], buckets: Iterable[str]) -> int:
    """Delete the account's documents written for head ``ref`` or older (its version)
    that are not in ``keep``: every window aggregate and bucket index, every version of
    the buckets listed (``"m <start>"``, ``"h <start>"``), and the head versions before
    ``ref``. One ``delete_many`` per collection (per bucket for the buckets), by the
    account; how many documents went."""
    account = ref.account_id
    written_for = {"$or": [{"v": {"$lte": ref.version}}, {"v": {"$exists": False}}]}
    deleted = 0
    aggregates: list[tuple[Kind, str]] = [("window", f"{account}|w|"), ("index", f"{account}|i|")]
    for kind, marker in aggregates:
        kept = [doc_id for doc_id in keep if doc_id.startswith(marker)]
        found = await db[COLLECTIONS[kind]].delete_many(
            {"account_id": account, "_id": {"$nin": kept}, **written_for}
        )
        deleted += found.deleted_count
    for bucket in buckets:
        letter, _, start = bucket.partition(" ")
        resolution: Kind = "minute" if letter == "m" else "hour"
        prefix = f"{account}|{letter}|{start}|"
        kept = [doc_id for doc_id in keep if doc_id.startswith(prefix)]
        found = await db[COLLECTIONS[resolution]].delete_many(
            {"account_id": account, "start": to_datetime(int(start)), "_id": {"$nin": kept},
             **written_for})  # fmt: skip
        deleted += found.deleted_count
    await db[keys.HEADS].delete_many({"account_id": account, "version": {"$lt": ref.version}})
    return deleted


def named_by(head: Head | None) -> set[str]:
    """The ids of every document ``head`` reads: buckets, windows, index."""
    if head is None:
        return set()
    named = {document_of(ref) for ref in head.windows.values()}
    for resolution in ("minute", "hour"):
        named.update(head.bucket_doc_id(resolution, s) or "" for s in head.buckets(resolution))
    if head.index:
        named.add(head.index)
    return named


def buckets_of(retired: Iterable[tuple[Kind, str]]) -> set[str]:
    """The buckets (``"m <start>"``, ``"h <start>"``) of superseded bucket versions."""
    found = set()
    for kind, doc_id in retired:
        if kind in ("minute", "hour"):
            found.add(f"{kind[0]} {doc_id.split('|')[2]}")
    return found


def retire_due(head: Head) -> bool:
    """Whether the head leaves superseded documents behind for the idle sweep."""
    return bool(head.retired) or head.version > head.swept


async def schedule_retired(redis: Redis, settings: Settings, head: Head) -> None:
    if retire_due(head):
        due = time.time() * 1000 + RETIRE_AFTER_MS
        partition = keys.rollup_partition_of(settings, head.account_id)
        await redis.zadd(keys.rollup_retire(settings, partition), {head.account_id: due})


class Sweep:
    def __init__(self, db: Database, redis: Redis, settings: Settings) -> None:
        self.db = db
        self.redis = redis
        self.settings = settings

    async def run(
        self, now: datetime | None = None, partitions: Iterable[int] | None = None
    ) -> tuple[int, int]:
        """(orphaned documents deleted, retired documents deleted); the retire schedules of
        these rollup partitions (all of them unless given)."""
        if partitions is None:
            partitions = range(self.settings.rollup_partitions)
        return await self.drafts(now or now_utc()), await self.retired(partitions)

    async def drafts(self, now: datetime) -> int:
        deleted = 0
        stale = self.db[keys.DRAFTS].find({"created_at": {"$lt": now - ORPHAN_AFTER}})
        async for record in stale.limit(MAX_PER_SWEEP):
            per_account: dict[str, list[tuple[Kind, str]]] = {}
            for item in record.get("docs", []):
                kind, doc_id = kind_and_id(item)
                per_account.setdefault(account_of(doc_id), []).append((kind, doc_id))
            for account, docs in per_account.items():
                # with its bucket index: the buckets it names are listed there, not in the head
                named = named_by(await read_head(self.db, account, with_index=True))
                if not any(doc_id in named for _, doc_id in docs):
                    for kind, doc_id in docs:
                        found = await self.db[COLLECTIONS[kind]].delete_one({"_id": doc_id})
                        deleted += found.deleted_count
            await self.db[keys.DRAFTS].delete_one({"_id": record["_id"]})
        if deleted:
            metrics.ROLLUP_ORPHANS_DELETED.labels("draft").inc(deleted)
            log.info("deleted %d rollup documents a dead pass left", deleted)
        return deleted

    async def retired(self, partitions: Iterable[int], seconds: float = RETIRED_SECONDS) -> int:
        """Retire what the idle accounts of these rollup partitions superseded (a few at
        once, for about ``seconds`` at most: the next sweep goes on)."""
        deleted = 0
        deadline = time.monotonic() + seconds
        gate = asyncio.Semaphore(RETIRING_AT_ONCE)

        async def retire(key: str, member: bytes, due_by: float) -> int:
            async with gate:
                if time.monotonic() > deadline:
                    return 0
                # (members were "account|version" before rollup partitions)
                head = await read_head(self.db, account_of(member.decode()), with_index=True)
                gone = 0
                if head is not None and retire_due(head):  # not rolled since: still current
                    buckets = set(head.rewritten) | buckets_of(head.retired)
                    gone = await retire_superseded(self.db, head, named_by(head), buckets)
                await self.redis.eval(_UNSCHEDULE, 1, key, member, due_by)
                return gone

        for partition in partitions:
            key = keys.rollup_retire(self.settings, partition)
            now = time.time() * 1000
            due: list[bytes] = await self.redis.zrangebyscore(  # type: ignore[assignment]
                key, "-inf", now, 0, MAX_PER_SWEEP
            )
            deleted += sum(await asyncio.gather(*(retire(key, m, now) for m in due)))
            if time.monotonic() > deadline:
                break
        if deleted:
            metrics.ROLLUP_ORPHANS_DELETED.labels("retired").inc(deleted)
        return deleted


# Drop an account from a retire schedule unless a later rollover scheduled it again.
# KEYS: schedule; ARGV: member, the time it was due by
_UNSCHEDULE = """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if due and tonumber(due) <= tonumber(ARGV[2]) then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 1
"""
