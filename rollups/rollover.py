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

import asyncio
import logging
import secrets
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from cachetools import LRUCache
from pymongo import DeleteOne
from pymongo.errors import BulkWriteError, PyMongoError, WriteError

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
    WINDOW_SET_ENTRIES,
    Head,
    Kind,
    Series,
    bucket_id,
    document,
    document_of,
    index_id,
    read_head,
    read_packed,
    read_series,
    window_id,
    window_ref,
    window_set_id,
)
from core.settings import Settings
from core.store import DUPLICATE_KEY, Database, Document
from core.tail import StreamId, TailEntry, format_id, read_many_tails, read_tails
from rollups.sweep import (
    GARBAGE_BYTES,
    buckets_of,
    draft_record,
    named_by,
    retire_superseded,
)

log = logging.getLogger(__name__)

# dict entries of cached documents (~400 MB at most): an account active every minute
# needs ~60 between two passes (its windows, hour bucket, recent minute buckets)
CACHE_ENTRIES = 4_000_000
SERIES_BYTES = 64 * 1024 * 1024  # encoded hour series kept (~2.5 KB for a busy hour)
READS_AT_ONCE = 16  # store reads in flight while preparing a batch
SWEEPS_AT_ONCE = 8  # accounts whose superseded documents are deleted at once
KEEP_HEAD_CALLS = 500  # head copies (or tail trims) per Redis script call
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

# Keep the newest head copies for readers, for many accounts whose copies share a
# slot (one stream partition's): a rollup job that lost its lease mid-way must not
# put back an older head after the tail was trimmed for a newer. A copy lapses after
# HEAD_COPY_TTL_SECONDS without a rollover (an idle account's readers then read its
# head from the store). With ``only kept`` 1, a copy that lapsed is not put back: a
# head that wrote nothing (published by a process that died before copying it) only
# raises a copy readers still hold (without one they read the store's newest).
# KEYS: head copies; ARGV: ttl, only kept (0/1), then per key: version, copy
_KEEP_HEADS = """
local floor = tonumber(ARGV[2])
for i = 1, #KEYS do
  local kept = tonumber(redis.call('HGET', KEYS[i], 'v') or '0')
  if kept >= floor and tonumber(ARGV[2 * i + 1]) > kept then
    redis.call('HSET', KEYS[i], 'v', ARGV[2 * i + 1], 'h', ARGV[2 * i + 2])
    redis.call('EXPIRE', KEYS[i], ARGV[1])
  end
end
return 1
"""

# _TRIM for many accounts whose tails share a slot (one stream partition's).
# KEYS: per account: tail, dirty set; ARGV: per account: account, n, n ids to delete
TRIM_MANY = """
local pos = 1
for i = 1, #KEYS, 2 do
  local account, n = ARGV[pos], tonumber(ARGV[pos + 1])
  for j = pos + 2, pos + 1 + n, 1000 do  -- unpack() refuses more than ~8000 values
    redis.call('XDEL', KEYS[i], unpack(ARGV, j, math.min(j + 999, pos + 1 + n)))
  end
  pos = pos + 2 + n
  if redis.call('XLEN', KEYS[i]) == 0 then
    redis.call('DEL', KEYS[i])
    redis.call('SREM', KEYS[i + 1], account)
  end
end
return 1
"""


class HeadConflict(Exception):
    """Another rollup job moved the head first; this rollover was dropped."""


class Fenced(HeadConflict):
    """The head was written under a newer fencing token than this roller's: another
    process holds the account's rollup partition now (rollups/lease.py)."""


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
    entries: list[TailEntry] = field(default_factory=list)  # the tail it read

    def rolled(self) -> Rolled:
        rolled = Rolled(self.new, events=sum(c.total for c in self.applied.values()))
        rolled.documents = {kind: len(written) for kind, written in self.docs.items()}
        return rolled


@dataclass
class Published:
    """What publishing a batch of drafts came to, draft by draft."""

    won: list[Draft] = field(default_factory=list)  # its head is the account's now
    raced: list[Draft] = field(default_factory=list)  # another head took its version
    fenced: list[Draft] = field(default_factory=list)  # a newer lease holder's head is there
    failed: list[tuple[Draft, Exception]] = field(default_factory=list)  # a write refused


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

    def __init__(self, db: Database, redis: Redis, settings: Settings,
                 fence: dict[int, int] | None = None) -> None:  # fmt: skip
        self.db = db
        self.redis = redis
        self.settings = settings
        self.partitions = keys.partitions(settings)
        self.cache = DocumentCache()
        # the heads this process wrote or read: an account idle long enough is read again
        self.heads: LRUCache[str, Head] = LRUCache(maxsize=settings.rollup_heads_kept)
        # the hour series this process wrote or read, encoded (an hour bucket is rewritten
        # with its series every minute the account is active)
        self.series: LRUCache[str, bytes] = LRUCache(maxsize=SERIES_BYTES, getsizeof=len)
        # rollup partition -> the fencing token of the lease this roller works under (a
        # ``Leases.held``, which its ticks keep current); a head of an account whose
        # partition is not here is written under token 0, which a head written under
        # any lease refuses (rollups/lease.py)
        self.fence: dict[int, int] = {} if fence is None else fence
        # documents read ahead for the pass in progress (rollups/batch.py ``prefetch``)
        self.prefetched: dict[str, Counts] = {}
        self._sweeping: set[asyncio.Future[None]] = set()  # retiring under way
        self._sweep_gate = asyncio.Semaphore(SWEEPS_AT_ONCE)
        self._trim = redis.register_script(_TRIM)
        self._trim_many = redis.register_script(TRIM_MANY)

    def forget_heads(self, partitions: Iterable[int] | None = None) -> None:
        """Another job may have written heads (we lost the lease for a while): all of
        them, or those of accounts of these rollup partitions."""
        if partitions is None:
            self.heads.clear()
            return
        gone = set(partitions)
        for account in [a for a in self.heads if self.partition_of(a) in gone]:
            self.heads.pop(account, None)

    def partition_of(self, account_id: str) -> int:
        return keys.rollup_partition_of(self.settings, account_id)

    def lane(self, account_id: str) -> str:
        return keys.rollup_lane(self.settings, self.partition_of(account_id))

    def token(self, account_id: str) -> int:
        """The fencing token this roller writes the account's heads under."""
        return self.fence.get(self.partition_of(account_id), 0)

    async def head(self, account_id: str) -> Head:
        cached = self.heads.get(account_id)
        if cached is not None:
            return cached
        return await read_head(self.db, account_id, with_index=True) or Head(account_id)

    async def heads_of(self, accounts: Sequence[str]) -> dict[str, Head]:
        """Many accounts' heads: those kept in memory, the others read (a few at once)."""
        found = {a: h for a in accounts if (h := self.heads.get(a)) is not None}
        gate = asyncio.Semaphore(READS_AT_ONCE)

        async def read(account: str) -> None:
            async with gate:
                found[account] = await self.head(account)

        await asyncio.gather(*(read(a) for a in accounts if a not in found))
        return found

    async def read_tail(self, account_id: str) -> list[TailEntry]:
        return (await read_tails(self.redis, self.partitions, account_id)).entries

    async def read_tail_of(self, accounts: Sequence[str]) -> dict[str, list[TailEntry]]:
        """Many accounts' tails, in pipelined calls."""
        return await read_many_tails(self.redis, self.partitions, accounts)

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
        draft = await self.prepare(old, entries, minute, corrections, erasure)
        if draft is None:
            return None
        await self._publish(draft)
        return draft.rolled()

    async def prepare(
        self,
        old: Head,
        entries: list[TailEntry],
        minute: int,
        corrections: dict[int, Counts] | None = None,
        erasure: str = "",
    ) -> Draft | None:
        """The new head of a rollover of ``old`` to ``minute`` and the documents it names,
        not written yet; None when there is nothing to do."""
        corrections = corrections or {}
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
            swept=old.swept,
            garbage=old.garbage,
            rewritten=list(old.rewritten),
        )
        draft = Draft(old, new, applied, entries=entries)
        await self._move_windows(draft)
        await self._write_buckets(draft)
        self._prune_indexes(new)
        if (new.minutes, new.hours) != (old.minutes, old.hours) or new.index is None:
            if old.index:
                draft.retired.append(("index", old.index))
            new.index = index_id(new.account_id, draft.tag)
            draft.docs["index"].append(new.index_document())
        new.retired = draft.retired
        return draft

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
                   erasure=erasure, swept=old.swept, garbage=old.garbage,
                   rewritten=list(old.rewritten))  # fmt: skip
        try:
            await self._publish(Draft(old, new, {}, entries=entries))
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
        cached = self.cache.get(doc_id) or self.prefetched.get(doc_id)
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
        moved: dict[str, Counts] = {}
        for window in WINDOWS:
            start = window_start(window, new.minute)
            entering = [c for m, c in draft.applied.items() if start <= m]
            leaving: list[Counts] = []
            if old.minute is not None:
                resolution = leaving_resolution(window)
                gone_from, gone_to = window_start(window, old.minute), start
                for bucket_start in starts_between(old.buckets(resolution), gone_from, gone_to,
                                                   resolution):  # fmt: skip
                    doc_id = old.bucket_doc_id(resolution, bucket_start)
                    leaving.append(await self._counts(resolution, doc_id))
            if not entering and not leaving:
                continue
            counts = (await self._counts("window", old.windows.get(window))).copy()
            for gone in leaving:
                counts.merge(gone, -1)
            for came in entering:
                counts.merge(came)
            moved[window] = counts
        if not moved:
            return
        every = {w: moved[w] if w in moved else await self._counts("window", old.windows[w])
                 for w in WINDOWS if w in moved or w in old.windows}  # fmt: skip
        every = {w: counts for w, counts in every.items() if counts}
        if sum(_entries(counts) for counts in every.values()) <= WINDOW_SET_ENTRIES:
            self._write_window_set(draft, every)
        else:
            self._write_windows(draft, moved)
        named = {document_of(ref) for ref in new.windows.values()}
        superseded = {document_of(ref) for ref in old.windows.values()} - named
        draft.retired.extend(("window", doc_id) for doc_id in sorted(superseded))

    def _write_window_set(self, draft: Draft, every: dict[str, Counts]) -> None:
        """All the account's non-empty windows in one document (a window set)."""
        new = draft.new
        assert new.minute is not None
        set_id = window_set_id(new.account_id, new.minute, draft.tag)
        new.windows = {window: window_ref(set_id, window) for window in every}
        for window, counts in every.items():
            self.cache.put(new.windows[window], counts)
        if every:
            packed = {window: pack(counts) for window, counts in every.items()}
            draft.docs["window"].append(document("window", set_id, new.account_id, new.minute,
                                                 {"windows": packed}, minute=new.minute,
                                                 v=new.version))  # fmt: skip

    def _write_windows(self, draft: Draft, moved: dict[str, Counts]) -> None:
        """A document for each window that moved (windows too large to share one)."""
        new = draft.new
        assert new.minute is not None
        for window, counts in moved.items():
            if not counts:
                new.windows.pop(window, None)
                continue
            doc_id = window_id(new.account_id, window, new.minute, draft.tag)
            new.windows[window] = doc_id
            self.cache.put(doc_id, counts)
            aggregate = document("window", doc_id, new.account_id,
                                 window_start(window, new.minute), pack(counts), window=window,
                                 minute=new.minute, v=new.version)  # fmt: skip
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
        extra: dict[str, Any] = {"v": new.version}
        doc_id = bucket_id(new.account_id, resolution, start, draft.tag)
        if series is not None:
            current = await self._series(current_id)
            for m, delta in series:
                current.add(m, delta)
            extra["series"] = current.encode()
            self.series[doc_id] = bytes(extra["series"])
        new.buckets(resolution)[start] = draft.tag
        if current_id:
            draft.retired.append((resolution, current_id))
        self.cache.put(doc_id, counts)
        draft.docs[resolution].append(document(
            resolution, doc_id, new.account_id, start, pack(counts),
            rollup_partition=self.lane(new.account_id), **extra))  # fmt: skip

    async def _series(self, doc_id: str | None) -> Series:
        if doc_id is None:
            return Series()
        kept = self.series.get(doc_id)
        if kept is not None:
            return Series.decode(kept)
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

    async def _publish(self, draft: Draft) -> None:
        """Publish one draft (:meth:`publish`); HeadConflict (Fenced) if its head did not
        go in, or the store's refusal."""
        published = await self.publish([draft])
        await self.swept()
        if published.fenced:
            raise Fenced(draft.new.account_id)
        if published.raced:
            raise HeadConflict(draft.new.account_id)
        if published.failed:
            raise published.failed[0][1]

    async def publish(self, drafts: Sequence[Draft]) -> Published:
        """Insert the drafts' documents, then swing each account's head to them by
        compare-and-set: one ``insert_many`` per collection for every account of the
        batch, then one of the new head versions (``ordered=False``: the unique ``_id``
        lets one rollover per version through, and the duplicate-key errors name the
        accounts that lost a race).

        The documents are recorded first (one draft record for the batch) and the
        record removed once every head named them or they were discarded: a pass that
        dies in between leaves a record the sweep (``rollups/sweep.py``) finds its
        documents by. A draft whose account's head was written under a newer fencing
        token than this roller's is refused before anything is written; one that
        loses the race, or whose documents the store refused, has its documents
        deleted again, so no head ever names them. The winners' heads are copied to
        Redis; retiring (what they superseded) is decided on the way (:meth:`_retiring`)
        and runs after, beside the pass (:meth:`swept`)."""
        out = Published()
        live: list[Draft] = []
        for draft in drafts:
            token = self.token(draft.new.account_id)
            if draft.old.fence > token:  # a newer holder of the partition wrote it
                out.fenced.append(draft)
                self.heads.pop(draft.new.account_id, None)
            else:
                draft.new.fence = token
                live.append(draft)
        if not live:
            return out
        tag = secrets.token_hex(8)
        recorded = any(any(d.docs.values()) for d in live)
        if recorded:
            await self.db[keys.DRAFTS].insert_one(draft_record(tag, [d.docs for d in live]))
        refused: dict[int, Exception] = {}  # index in live -> why the store refused it
        for kind, collection in COLLECTIONS.items():
            owners = [i for i, d in enumerate(live) for _ in d.docs[kind]]
            if owners:
                written = [doc for d in live for doc in d.docs[kind]]
                refused.update(await _insert_all(self.db[collection], written, owners))
        sweeping = self._retiring([d for i, d in enumerate(live) if i not in refused])
        trying = [i for i in range(len(live)) if i not in refused]
        heads = [live[i].new.to_document() for i in trying]
        raced = set()
        for index, error in (await _insert_all(self.db[keys.HEADS], heads, trying)).items():
            if isinstance(error, WriteError) and error.code == DUPLICATE_KEY:
                raced.add(index)
            else:
                refused[index] = error
        for i, draft in enumerate(live):
            if i in raced:
                out.raced.append(draft)
            elif i in refused:
                out.failed.append((draft, refused[i]))
            else:
                out.won.append(draft)
        lost = [d for d in (*out.raced, *(d for d, _ in out.failed))]
        await self._discard([d.docs for d in lost])
        for draft in lost:
            self.heads.pop(draft.new.account_id, None)
        if recorded:
            await self.db[keys.DRAFTS].delete_one({"_id": tag})
        # before the tail is trimmed: a reader of the copy and the tail misses nothing
        await self._keep_heads([d.new for d in out.won])
        for draft in out.won:
            self.heads[draft.new.account_id] = draft.new
        won = {id(d) for d in out.won}
        for draft in sweeping:
            if id(draft) in won:
                task = asyncio.ensure_future(self._sweep(draft))
                self._sweeping.add(task)
                task.add_done_callback(self._sweeping.discard)
        return out

    async def swept(self) -> None:
        """Wait for the retiring the published rollovers started (:meth:`_retiring`)."""
        await asyncio.gather(*self._sweeping)

    def _retiring(self, drafts: Sequence[Draft]) -> list[Draft]:
        """Retiring, in arrears: what a rollover supersedes (the window aggregates, bucket
        versions and bucket index it replaces, the previous head) is not deleted one
        document at a time (a delete costs the store ~20 inserts) but every
        ``ROLLUP_SWEEP_EVERY`` rollovers of the account (or once ~``GARBAGE_BYTES`` were
        superseded), all of it with one delete per collection, before the new head
        goes in (``rollups/sweep.py`` ``retire_superseded``). What the old head itself
        superseded is kept, for readers still holding the head before it; an idle
        account's rest goes with the sweep ``RETIRE_AFTER_MS`` after its last rollover.
        The new head records where this leaves the account (``swept``, ``garbage``,
        ``rewritten``); an account's first head starts it at a point of the cycle of its
        own (a hash), so that accounts that start together retire in different passes.

        This decides, before the heads go in; the deletes run once a head is published,
        beside the rest of the pass (:meth:`swept` waits for them). If they fail (or the
        process dies first), what they were to delete waits for the account's next
        retiring, except the older versions of the buckets listed (``rewritten``), which
        retention deletes (minute buckets after 2 days, hour buckets after 90)."""
        due: list[Draft] = []
        every = self.settings.rollup_sweep_every
        for draft in drafts:
            old, new = draft.old, draft.new
            superseded = sum(_binary_bytes(doc) for kind in ("window", "hour", "index")
                             for doc in draft.docs[kind])  # fmt: skip
            mine = buckets_of(new.retired)
            if not old.version:
                new.swept = -(zlib.crc32(new.account_id.encode()) % every)
            elif new.version - old.swept >= every or old.garbage + superseded >= GARBAGE_BYTES:
                due.append(draft)
                new.swept, new.garbage = new.version, superseded
                new.rewritten = sorted(buckets_of(old.retired) | mine)
            else:
                new.garbage = old.garbage + superseded
                new.rewritten = sorted(set(old.rewritten) | mine)
        return due

    async def _sweep(self, draft: Draft) -> None:
        old, new = draft.old, draft.new
        keep = named_by(old) | named_by(new) | {doc_id for _, doc_id in old.retired}
        async with self._sweep_gate:
            try:
                await retire_superseded(self.db, old, keep, old.rewritten)
            except PyMongoError as exc:
                log.warning("could not retire what account %s superseded (the next retiring "
                            "does): %s", new.account_id, exc)  # fmt: skip

    async def retire_all(self, head: Head) -> int:
        """Delete every document of the account that ``head`` does not name (written for
        it or an older head), and its older head versions: what an erasure leaves."""
        buckets = set(head.rewritten) | buckets_of(head.retired)
        return await retire_superseded(self.db, head, named_by(head), sorted(buckets))

    async def raise_copies(self, heads: Sequence[Head]) -> None:
        """Raise the Redis copies older than these heads (read from the store), before
        trimming the tail entries they applied: a process that published a head and died
        before copying it left readers the copy before, which needs those entries."""
        await self._keep_heads(heads, only_kept=True)

    async def _keep_heads(self, heads: Sequence[Head], only_kept: bool = False) -> None:
        """Keep the new heads' copies in Redis (with ``only_kept``, raise only copies that
        exist): one script call per stream partition (the slot of the copies) for up to
        ``KEEP_HEAD_CALLS`` heads, pipelined."""
        if not heads:
            return
        fixed = [self.settings.head_copy_ttl_seconds, int(only_kept)]
        groups: dict[str, tuple[list[str], list[Any]]] = {}
        for head in heads:
            part = keys.partition_of(self.settings, head.account_id)
            copies, args = groups.setdefault(part.tag, ([], []))
            copies.append(part.head(head.account_id))
            args += [head.version, head.copy()]
        sha = await self.redis.script_load(_KEEP_HEADS)
        async with self.redis.pipeline(transaction=False) as pipe:
            for copies, args in groups.values():
                for start in range(0, len(copies), KEEP_HEAD_CALLS):
                    end = start + KEEP_HEAD_CALLS
                    pipe.evalsha(sha, len(copies[start:end]), *copies[start:end], *fixed,
                                 *args[2 * start : 2 * end])  # fmt: skip
            await pipe.execute()

    async def _discard(self, written: Sequence[dict[Kind, list[Document]]]) -> None:
        """Delete documents no head will name (one bulk delete per collection)."""
        for kind, collection in COLLECTIONS.items():
            ids = [doc["_id"] for docs in written for doc in docs[kind]]
            if ids:
                await self.db[collection].bulk_write([DeleteOne({"_id": i}) for i in ids],
                                                     ordered=False)  # fmt: skip

    def trim_calls(self, account_id: str, entries: list[TailEntry],
                   head: Head) -> list[tuple[list[str], list[str]]]:  # fmt: skip
        """The ``_TRIM`` calls (keys, args) that drop the tail entries ``head`` applied and
        needs no more, one per stream partition."""
        by_partition: dict[int, list[str]] = {}
        for entry in applied_by(head, entries):
            by_partition.setdefault(entry.partition, []).append(format_id(entry.entry_id))
        dirty = self.partition_of(account_id)
        return [([part.tail(account_id), keys.dirty_set(self.settings, part, dirty)],
                 [account_id, *by_partition.get(part.index, [])])
                for part in self.partitions]  # fmt: skip

    async def _trim_tail(self, account_id: str, entries: list[TailEntry], head: Head) -> None:
        for trim_keys, args in self.trim_calls(account_id, entries, head):
            await self._trim(keys=trim_keys, args=args)

    def many_trims_calls(
        self, rolled: Sequence[tuple[Head, list[TailEntry]]]
    ) -> list[tuple[str, tuple[Any, ...]]]:
        """The tail trims of many accounts' heads (each with the tail read for it) as
        pipeline calls (method, arguments): one ``TRIM_MANY`` script call per stream
        partition for up to ``KEEP_HEAD_CALLS`` accounts (their tails and dirty sets share
        its slot). Needs ``TRIM_MANY`` loaded in Redis first (``rollups/batch.py`` does)."""
        groups: dict[str, list[tuple[list[str], list[str]]]] = {}
        for head, entries in rolled:
            if head.minute is None:
                continue  # never rolled: nothing applied
            for trim_keys, args in self.trim_calls(head.account_id, entries, head):
                groups.setdefault(trim_keys[0].partition("}")[0], []).append((trim_keys, args))
        calls: list[tuple[str, tuple[Any, ...]]] = []
        sha = self._trim_many.sha
        for group in groups.values():
            for start in range(0, len(group), KEEP_HEAD_CALLS):
                script_keys: list[str] = []
                script_args: list[str | int] = []
                for (tail_key, dirty), (account, *ids) in group[start : start + KEEP_HEAD_CALLS]:
                    script_keys += [tail_key, dirty]
                    script_args += [account, len(ids), *ids]
                calls.append(("evalsha", (sha, len(script_keys), *script_keys, *script_args)))
        return calls


async def _insert_all(
    collection: Any, docs: list[Document], owners: Sequence[int]
) -> dict[int, Exception]:
    """Insert every document (unordered); which owners had one refused, and why. A write
    concern error, or any other failure of the call, is raised."""
    try:
        await collection.insert_many(docs, ordered=False)
        return {}
    except BulkWriteError as exc:
        if exc.details.get("writeConcernErrors"):
            raise
        refused: dict[int, Exception] = {}
        for error in exc.details.get("writeErrors", []):
            owner = owners[int(error["index"])]
            refused.setdefault(owner, WriteError(error.get("errmsg", ""), error.get("code"),
                                                 error))  # fmt: skip
        return refused


def applied_by(head: Head, entries: list[TailEntry]) -> list[TailEntry]:
    """The tail entries ``head`` applied and needs no more (a rollover's trim)."""
    assert head.minute is not None
    minute = head.minute
    return [e for e in entries if e.entry_id <= head.applied_id(e.partition) and e.newest < minute]


def _binary_bytes(doc: Document) -> int:
    """Roughly what a rollup document weighs: its packed fields (a window set's too)."""
    return sum(len(v) if isinstance(v, bytes) else _binary_bytes(v) if isinstance(v, dict)
               else 0 for v in doc.values())  # fmt: skip


def _advanced(applied: dict[int, StreamId], entries: list[TailEntry]) -> dict[int, StreamId]:
    out = dict(applied)
    for entry in entries:
        if entry.entry_id > out.get(entry.partition, (0, 0)):
            out[entry.partition] = entry.entry_id
    return out


STEPS_BEFORE_SCANNING = 64


def starts_between(buckets: dict[int, str], lo: int, hi: int, resolution: Resolution) -> list[int]:
    """The bucket starts in ``[lo, hi)``, in order: by stepping through the range when it
    holds fewer steps than there are buckets (a window moving on by a minute, for an
    account with two days of minute buckets), else by looking at every bucket."""
    step = MINUTE if resolution == "minute" else HOUR
    first = -(-lo // step) * step
    if (hi - first) // step < len(buckets):
        return [s for s in range(first, hi, step) if s in buckets]
    return sorted(s for s in buckets if lo <= s < hi)


def first_from(buckets: dict[int, str], lo: int, resolution: Resolution) -> int | None:
    """The first bucket start at or after ``lo``: a few steps, then every bucket."""
    step = MINUTE if resolution == "minute" else HOUR
    first = -(-lo // step) * step
    if len(buckets) > STEPS_BEFORE_SCANNING:
        for s in range(first, first + STEPS_BEFORE_SCANNING * step, step):
            if s in buckets:
                return s
    inside = [b for b in buckets if b >= lo]
    return min(inside) if inside else None


def next_change(head: Head) -> int | None:
    """The first minute at which a bucket of this account leaves one of its windows."""
    if head.minute is None:
        return None
    due: list[int] = []
    for window, length in WINDOWS.items():
        start = window_start(window, head.minute)
        resolution = leaving_resolution(window)
        first = first_from(head.buckets(resolution), start, resolution)
        if first is None:
            continue
        # it leaves once the window starts after it
        due.append(first + MINUTE + length if resolution == "minute" else first + HOUR + length)
    return min(due) if due else None
