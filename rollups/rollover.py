"""Rolling an account forward: tail events into buckets, windows moved to a new minute.

A rollover of one account to minute ``S`` (``core/rollup_docs.py`` has the
documents):

1. takes the tail events that now belong in buckets: those before ``S`` that
   the account's aggregates do not hold yet (events at or after the previous
   ``S`` from any tail entry, and earlier, late ones from entries it had not
   applied);
2. writes new versions of the minute and hour buckets they fall in;
3. moves every window aggregate from ``[start(w, S_old), S_old)`` to
   ``[start(w, S), S)``: minus the buckets that left (as they were, before this
   rollover), plus the events that entered;
4. publishes it all by compare-and-set of the head, then deletes what the
   previous rollover superseded and trims the tail entries nothing needs.

Nothing is ever recounted from raw events and nothing is incremented in
place: every figure is derived from immutable documents plus tail events the
flusher counted exactly once. A rollover that loses the head race, or dies
half-way, leaves only documents no head names; running it again gives the
same result.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from cachetools import LRUCache
from pymongo.errors import DuplicateKeyError

from core import keys
from core.buckets import (
    HOUR,
    MINUTE,
    WINDOWS,
    Counts,
    Resolution,
    floor,
    leaving_resolution,
    pack,
    window_start,
)
from core.connections import Redis
from core.rollup_docs import (
    COLLECTIONS,
    Head,
    Kind,
    Series,
    bucket_id,
    document,
    head_id,
    index_id,
    read_head,
    read_packed,
    read_series,
    window_id,
)
from core.settings import Settings
from core.store import Database, Document
from core.tail import StreamId, TailEntry, format_id, read_tails
from rollups.sweep import draft_record

log = logging.getLogger(__name__)

CACHE_ENTRIES = 2_000_000  # dict entries of cached documents (~200 MB at most)
_encode = msgspec.msgpack.Encoder().encode

# Delete the account's tail entries that were applied and hold nothing at or
# after the new minute; once its tail is empty, delete the stream itself (an
# account seen once must not keep a key for ever) and drop the account from the
# dirty set (the flusher adds both back with its next entry).
# KEYS: tail, dirty; ARGV: account, ids to delete...
_TRIM = """
for i = 2, #ARGV, 1000 do  -- unpack() refuses more than ~8000 values at once
  redis.call('XDEL', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[1])
end
return 1
"""

# Keep the newest head's copy for readers: a rollup job that lost its lease
# mid-way must not put back an older head after the tail was trimmed for a newer.
# The copy lapses after HEAD_COPY_TTL_SECONDS without a rollover (an idle
# account's readers then read its head from the store).
# KEYS: head copy; ARGV: version, copy, ttl
_KEEP_HEAD = """
local kept = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if tonumber(ARGV[1]) <= kept then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'h', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


class HeadConflict(Exception):
    """Another rollup job moved the head first; this rollover was dropped."""


@dataclass
class Rolled:
    """What one rollover did."""

    head: Head
    events: int = 0
    documents: dict[Kind, int] = field(default_factory=dict)


@dataclass
class Draft:
    """One rollover being written: from the old head to the new one."""

    old: Head
    new: Head
    applied: dict[int, Counts]  # per minute, what enters the buckets now
    # the rollover's own tag in every id it writes: two jobs never write the same id
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    docs: dict[Kind, list[Document]] = field(
        default_factory=lambda: {"minute": [], "hour": [], "window": [], "index": []}
    )
    retired: list[tuple[Kind, str]] = field(default_factory=list)  # superseded ids


def _entries(counts: Counts) -> int:
    """What a document costs in memory, in dict entries (its users dominate)."""
    return 1 + len(counts.types) + len(counts.users)


class DocumentCache:
    """Immutable rollup documents by id: a cached one is never stale. Bounded by the
    dict entries the documents hold, not their number: one hour bucket may hold
    hundreds of thousands of users."""

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self._items: LRUCache[str, Counts] = LRUCache(maxsize=entries, getsizeof=_entries)

    def get(self, doc_id: str) -> Counts | None:
        return self._items.get(doc_id)

    def put(self, doc_id: str, counts: Counts) -> None:
        if _entries(counts) <= self._items.maxsize:  # else cachetools refuses it
            self._items[doc_id] = counts


class Roller:
    """Rolls accounts forward; keeps the heads and documents it has seen in memory."""

    def __init__(self, db: Database, redis: Redis, settings: Settings) -> None:
        self.db = db
        self.redis = redis
        self.settings = settings
        self.partitions = keys.partitions(settings)
        self.cache = DocumentCache()
        # the heads this process wrote or read: an account idle long enough is read again
        self.heads: LRUCache[str, Head] = LRUCache(maxsize=settings.rollup_heads_kept)
        self._trim = redis.register_script(_TRIM)
        self._keep_head = redis.register_script(_KEEP_HEAD)

    def forget_heads(self) -> None:
        """Another job may have written heads (we lost the lease for a while)."""
        self.heads.clear()

    async def head(self, account_id: str) -> Head:
        cached = self.heads.get(account_id)
        if cached is not None:
            return cached
        return await read_head(self.db, account_id, with_index=True) or Head(account_id)

    async def read_tail(self, account_id: str) -> list[TailEntry]:
        return (await read_tails(self.redis, self.partitions, account_id)).entries

    async def roll(
        self,
        account_id: str,
        minute: int,
        corrections: dict[int, Counts] | None = None,
        erasure: str = "",
    ) -> Rolled | None:
        """Roll one account to ``minute``; None when there was nothing to do.

        ``corrections`` (per minute, signed; from the backfill and erasures) are
        applied as if they were tail events. ``erasure`` (an erasure's run id)
        always writes a new head, one more erasure on it, naming that run: readers'
        running counts of the tail start afresh (``service/tail_counts.py``).
        """
        head = await self.head(account_id)
        entries = await self.read_tail(account_id)
        try:
            rolled = await self._roll(head, entries, minute, corrections or {}, erasure)
        except HeadConflict:
            self.heads.pop(account_id, None)
            raise
        if rolled is None:
            return None
        self.heads[account_id] = rolled.head
        await self._delete_retired(head.retired)
        await self._trim_tail(account_id, entries, rolled.head)
        return rolled

    async def _roll(
        self,
        old: Head,
        entries: list[TailEntry],
        minute: int,
        corrections: dict[int, Counts],
        erasure: str = "",
    ) -> Rolled | None:
        if old.minute is not None and minute < old.minute:
            return None  # a clock that went back; the next pass catches up
        applied = self._to_apply(old, entries, minute)
        for m, delta in corrections.items():
            applied.setdefault(m, Counts()).merge(delta)
        applied = {m: c for m, c in applied.items() if c.total or c.types or c.users}
        moved = old.minute != minute
        if not applied and not moved and not erasure:
            return None
        new = Head(
            account_id=old.account_id,
            version=old.version + 1,
            minute=minute,
            applied=_advanced(old.applied, entries),
            windows=dict(old.windows),
            minutes=dict(old.minutes),
            hours=dict(old.hours),
            index=old.index,
            erased=old.erased + 1 if erasure else old.erased,
            erasure=erasure or old.erasure,
        )
        draft = Draft(old, new, applied)
        await self._move_windows(draft)
        await self._write_buckets(draft)
        self._prune_indexes(new)
        if (new.minutes, new.hours) != (old.minutes, old.hours) or new.index is None:
            if old.index:
                draft.retired.append(("index", old.index))
            new.index = index_id(new.account_id, draft.tag)
            draft.docs["index"].append(new.index_document())
        new.retired = draft.retired
        await self._publish(old, new, draft.docs, draft.tag)
        rolled = Rolled(new, events=sum(c.total for c in applied.values()))
        rolled.documents = {kind: len(written) for kind, written in draft.docs.items()}
        return rolled

    async def reset(self, account_id: str, minute: int, erasure: str) -> Head:
        """Publish an empty head for the account (no figures, one more erasure, naming
        the run ``erasure``): what erasing a whole account leaves. Its documents, tail
        and raw events are the eraser's to delete (``rollups/erasure.py``); the head is
        kept, with its version, so a rollover that read an older head cannot publish
        over it (compare-and-set) and no cached answer's key comes back."""
        old = await self.head(account_id)
        entries = await self.read_tail(account_id)
        new = Head(account_id, version=old.version + 1,
                   minute=minute if old.minute is None else max(minute, int(old.minute)),
                   applied=_advanced(old.applied, entries), erased=old.erased + 1,
                   erasure=erasure)  # fmt: skip
        try:
            await self._publish(old, new, {kind: [] for kind in COLLECTIONS})
        except HeadConflict:
            self.heads.pop(account_id, None)
            raise
        self.heads[account_id] = new
        return new

    def _to_apply(self, old: Head, entries: list[TailEntry], minute: int) -> dict[int, Counts]:
        """Tail events that belong in buckets now, counted per minute."""
        per_minute: dict[int, Counts] = {}
        since = old.minute
        for entry in entries:
            unapplied = entry.entry_id > old.applied_id(entry.partition)
            events = entry.events
            for ts, event_type, user in zip(events.ts, events.types, events.users, strict=True):
                if ts >= minute:
                    continue  # still ahead: stays in the tail
                if (since is not None and ts >= since) or unapplied:
                    m = ts - ts % MINUTE
                    counts = per_minute.get(m)
                    if counts is None:
                        counts = per_minute[m] = Counts()
                    counts.add_event(event_type, user)
        return per_minute

    async def _counts(self, kind: Kind, doc_id: str | None) -> Counts:
        if doc_id is None:
            return Counts()
        cached = self.cache.get(doc_id)
        if cached is not None:
            return cached
        packed = await read_packed(self.db, kind, doc_id)
        if packed is None:
            raise LookupError(f"{kind} document {doc_id} is missing")
        counts = packed.unpack()
        self.cache.put(doc_id, counts)
        return counts

    async def _move_windows(self, draft: Draft) -> None:
        old, new = draft.old, draft.new
        assert new.minute is not None
        for window in WINDOWS:
            start = window_start(window, new.minute)
            entering = [c for m, c in draft.applied.items() if start <= m]
            leaving: list[Counts] = []
            if old.minute is not None:
                resolution = leaving_resolution(window)
                gone_from, gone_to = window_start(window, old.minute), start
                for bucket_start in sorted(old.buckets(resolution)):
                    if gone_from <= bucket_start < gone_to:
                        doc_id = old.bucket_doc_id(resolution, bucket_start)
                        leaving.append(await self._counts(resolution, doc_id))
            if not entering and not leaving:
                continue
            current_id = old.windows.get(window)
            counts = (await self._counts("window", current_id)).copy()
            for gone in leaving:
                counts.merge(gone, -1)
            for came in entering:
                counts.merge(came)
            if current_id:
                draft.retired.append(("window", current_id))
            if not counts:
                new.windows.pop(window, None)
                continue
            doc_id = window_id(new.account_id, window, new.minute, draft.tag)
            new.windows[window] = doc_id
            self.cache.put(doc_id, counts)
            aggregate = document("window", doc_id, new.account_id, start, pack(counts),
                                 window=window, minute=new.minute)  # fmt: skip
            draft.docs["window"].append(aggregate)

    async def _write_buckets(self, draft: Draft) -> None:
        assert draft.new.minute is not None
        minute_floor = draft.new.minute - self.settings.minute_retention_hours * HOUR
        hour_floor = draft.new.minute - self.settings.hour_retention_days * 24 * HOUR
        per_hour: dict[int, list[tuple[int, Counts]]] = {}
        for m, delta in sorted(draft.applied.items()):
            per_hour.setdefault(floor(m, "hour"), []).append((m, delta))
            if m < minute_floor:
                continue  # past minute retention: only its hour is kept
            await self._new_version(draft, "minute", m, [delta])
        for h, minutes in per_hour.items():
            if h >= hour_floor:
                await self._new_version(draft, "hour", h, [d for _, d in minutes], minutes)

    async def _new_version(
        self,
        draft: Draft,
        resolution: Resolution,
        start: int,
        deltas: list[Counts],
        series: list[tuple[int, Counts]] | None = None,
    ) -> None:
        old, new = draft.old, draft.new
        current_id = old.bucket_doc_id(resolution, start)
        counts = (await self._counts(resolution, current_id)).copy()
        for delta in deltas:
            counts.merge(delta)
        extra: dict[str, Any] = {}
        if series is not None:
            current = await self._series(current_id)
            for m, delta in series:
                current.add(m, delta)
            extra["series"] = current.encode()
        doc_id = bucket_id(new.account_id, resolution, start, draft.tag)
        new.buckets(resolution)[start] = draft.tag
        if current_id:
            draft.retired.append((resolution, current_id))
        self.cache.put(doc_id, counts)
        draft.docs[resolution].append(document(resolution, doc_id, new.account_id, start,
                                               pack(counts), **extra))  # fmt: skip

    async def _series(self, doc_id: str | None) -> Series:
        if doc_id is None:
            return Series()
        found = await read_series(self.db, doc_id)
        if found is None:
            raise LookupError(f"hour bucket {doc_id} is missing")
        return found

    def _prune_indexes(self, head: Head) -> None:
        """Forget buckets past retention (retention deletes their documents)."""
        assert head.minute is not None
        minute_floor = head.minute - self.settings.minute_retention_hours * HOUR
        hour_floor = head.minute - self.settings.hour_retention_days * 24 * HOUR
        head.minutes = {m: v for m, v in head.minutes.items() if m >= minute_floor}
        head.hours = {h: v for h, v in head.hours.items() if h >= hour_floor}

    async def _publish(
        self, old: Head, new: Head, docs: dict[Kind, list[Document]], tag: str = ""
    ) -> None:
        """Insert the new documents, then swing the head to them (compare-and-set).

        The documents are recorded as a draft first, and the record removed once the
        head names them (or they are discarded): a pass that dies in between leaves a
        record the sweep (``rollups/sweep.py``) finds its documents by."""
        drafts = self.db[keys.DRAFTS]
        recorded = bool(tag) and any(docs.values())
        if recorded:
            await drafts.insert_one(draft_record(tag, new, docs))
        for kind, written in docs.items():
            if written:
                await self.db[COLLECTIONS[kind]].insert_many(written, ordered=False)
        heads = self.db[keys.HEADS]
        try:  # the unique _id lets one rollover per version through: the compare-and-set
            await heads.insert_one(new.to_document())
        except DuplicateKeyError:
            await self._discard(docs)
            if recorded:
                await drafts.delete_one({"_id": tag})
            raise HeadConflict(new.account_id) from None
        if recorded:
            await drafts.delete_one({"_id": tag})
        # before the tail is trimmed: a reader of the copy and the tail misses nothing
        copy_key = keys.head_copy(self.settings, new.account_id)
        ttl = self.settings.head_copy_ttl_seconds
        await self._keep_head(keys=[copy_key], args=[new.version, new.copy(), ttl])
        if old.version:
            await heads.delete_one({"_id": head_id(old.account_id, old.version)})

    async def _discard(self, docs: dict[Kind, list[Document]]) -> None:
        for kind, written in docs.items():
            for doc in written:
                await self.db[COLLECTIONS[kind]].delete_one({"_id": doc["_id"]})

    async def _delete_retired(self, retired: Iterable[tuple[Kind, str]]) -> None:
        for kind, doc_id in retired:
            await self.db[COLLECTIONS[kind]].delete_one({"_id": doc_id})

    async def _trim_tail(self, account_id: str, entries: list[TailEntry], head: Head) -> None:
        assert head.minute is not None
        by_partition: dict[int, list[str]] = {}
        for entry in entries:
            if entry.entry_id <= head.applied_id(entry.partition) and entry.newest < head.minute:
                by_partition.setdefault(entry.partition, []).append(format_id(entry.entry_id))
        for part in self.partitions:
            ids = by_partition.get(part.index, [])
            await self._trim(keys=[part.tail(account_id), part.dirty], args=[account_id, *ids])


def _advanced(applied: dict[int, StreamId], entries: list[TailEntry]) -> dict[int, StreamId]:
    out = dict(applied)
    for entry in entries:
        if entry.entry_id > out.get(entry.partition, (0, 0)):
            out[entry.partition] = entry.entry_id
    return out


def next_change(head: Head) -> int | None:
    """The first minute at which a bucket of this account leaves one of its windows."""
    if head.minute is None:
        return None
    due: list[int] = []
    for window, length in WINDOWS.items():
        start = window_start(window, head.minute)
        resolution = leaving_resolution(window)
        inside = [b for b in head.buckets(resolution) if b >= start]
        if not inside:
            continue
        first = min(inside)
        # it leaves once the window starts after it
        due.append(first + MINUTE + length if resolution == "minute" else first + HOUR + length)
    return min(due) if due else None
