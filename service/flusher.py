"""The flusher: stream entries in, raw events out to MongoDB, acknowledged after the write.

Exactly-once storage comes from two facts: an entry is acknowledged only after
its events are in MongoDB, and the write is idempotent (``_id`` is
``account_id|event_id``; a duplicate key counts as success). So a crash or an
outage at any point means a redo, never a loss or a double.

Exactly-once *counting* comes from what the acknowledgement carries: the
events this entry newly stored, appended to the accounts' live tails in the
same atomic Redis script as the XACK (``core/tail.py``; the entries of one
flush make one tail entry per account). On an entry's first
delivery those are the documents the insert did not report as duplicates; an
entry read before (recovered, reclaimed, or retried after a failed write) may
have stored some of them on an earlier attempt, so its events are read back by
their ``batch`` field instead. Either way an event is counted by the one entry
that stored it, and an entry another flusher has claimed meanwhile is not
acknowledged (nor counted) here.

Erasures: each flush first reads the erasure tombstones (``core/erasure.py``;
one HGET of their version, the hash only when it moved), after its entries were
delivered, so an entry delivered after a tombstone was set is checked against
it. An event a tombstone matches is not inserted; one an earlier attempt stored
is deleted when the entry is read back; neither is counted, shown on /stream, or
kept in a dead letter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar

import msgspec
from pymongo.errors import BulkWriteError, PyMongoError
from redis.exceptions import ClusterDownError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core import keys, metrics, store, tail
from core.buckets import ms
from core.connections import REDIS_ERRORS
from core.erasure import Matcher, TombstoneReader, queued_ms
from core.events import decode_events, encode_events, storage_id, to_document
from core.settings import Settings
from core.store import Document
from core.worker import Worker, run_worker
from service.live_events import Publisher
from service.queue import Consumer, Entry, Failure, Retirement

log = logging.getLogger(__name__)

# a Redis Cluster adds failing-over nodes and moving slots to the usual outages
TRANSIENT_REDIS = (RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError,
                   RedisClusterException, OSError)  # fmt: skip
MAX_BACKOFF = 5.0
CLAIM_EVERY_SECONDS = 5.0
ENTRIES_PER_READ = 100
READ_BACK_FIELDS = {"_id": 0, "event_id": 1, "account_id": 1, "type": 1, "user_id": 1,
                    "timestamp": 1}  # fmt: skip

T = TypeVar("T")


class Permanent(Exception):
    """MongoDB refused an entry's documents for a reason retrying cannot fix."""


class StoppedWhileRetrying(Exception):
    """Shutdown came while a server was unreachable; unacknowledged entries stay queued."""


@dataclass
class Batch:
    """One decoded entry and its documents."""

    entry: Entry
    docs: list[Document]
    erasures: Matcher = field(default_factory=Matcher)  # the tombstones it was checked against


def consumer_name(settings_instance: str, slot: int) -> str:
    """Unique per host and flusher slot, and the same after that flusher restarts."""
    return f"{settings_instance}:flusher-{slot}"


class Flusher(Worker):
    role = "flusher"

    def __init__(self, settings: Settings, slot: int = 0) -> None:
        super().__init__(settings)
        self.name = consumer_name(settings.instance, slot)
        parts = keys.partitions(settings)
        # flushers of different slots start on different partitions
        parts = parts[slot % len(parts) :] + parts[: slot % len(parts)]
        self.consumers = [Consumer(self.redis, p, self.name, settings) for p in parts]
        # batch id -> (failed attempts, epoch ms of the first): in this process only, so
        # a restarted flusher (or another that claims the entry) starts counting again
        self._failures: dict[str, tuple[int, int]] = {}
        self.live = Publisher(self.redis, settings)
        self.erasures = TombstoneReader(self.redis, settings)
        self._last_claim = 0.0
        self._entry_size = 100.0  # events per stream entry, a running average
        # partitions whose Redis node is unreachable: left alone until then, so a
        # Redis Cluster node that is down stops only its own partitions
        self._resting: dict[int, tuple[float, float]] = {}  # partition -> (until, delay)

    async def startup(self) -> None:
        for consumer in self.consumers:
            await consumer.ensure_group()
        await store.ensure_event_indexes(self.db, self.settings)

    async def main(self) -> None:
        try:
            for consumer in self.consumers:
                await self._drain(consumer, consumer.read_own_pending)
            lanes = [self._lane(i) for i in range(self.settings.flush_concurrency)]
            await asyncio.gather(*lanes)
        except StoppedWhileRetrying as exc:
            log.warning("stopped while retrying %s; unacknowledged entries stay queued", exc)

    async def _lane(self, lane: int) -> None:
        """One flush in flight at a time per lane; lanes overlap their writes."""
        turn = lane
        while not self.stopping.is_set():
            consumer = self.consumers[turn % len(self.consumers)]
            turn += 1
            if lane == 0:
                await self._claim_if_due()
            if not self._awake(consumer):
                await asyncio.sleep(0.05 if turn % len(self.consumers) == 0 else 0)
                continue
            try:
                entries = await self._collect(consumer)
            except TRANSIENT_REDIS as exc:
                self._rest(consumer, "read", exc)
                continue
            self._resting.pop(consumer.partition.index, None)
            if entries:
                await self.flush(consumer, entries)

    def _awake(self, consumer: Consumer) -> bool:
        until, _ = self._resting.get(consumer.partition.index, (0.0, 0.0))
        return time.monotonic() >= until

    def _rest(self, consumer: Consumer, what: str, exc: BaseException) -> None:
        _, delay = self._resting.get(consumer.partition.index, (0.0, 0.05))
        delay = min(MAX_BACKOFF, delay * 2)
        self._resting[consumer.partition.index] = (time.monotonic() + delay, delay)
        metrics.FLUSH_ERRORS.labels("transient").inc()
        log.warning("%s of partition %d failed (%s: %s); trying it again in %.1fs", what,
                    consumer.partition.index, type(exc).__name__, exc, delay)  # fmt: skip

    async def _drain(
        self, consumer: Consumer, read: Callable[[int], Awaitable[list[Entry]]]
    ) -> None:
        """Flush what an earlier run (or a dead consumer) left unacknowledged."""
        while not self.stopping.is_set() and self._awake(consumer):
            try:
                entries = await read(self._entries_per_flush())
            except TRANSIENT_REDIS as exc:
                # reclaiming picks them up once the partition answers again
                self._rest(consumer, "reading pending entries", exc)
                return
            if not entries:
                return
            log.info("recovering %d unacknowledged stream entries", len(entries))
            await self.flush(consumer, entries)

    async def _claim_if_due(self) -> None:
        # often enough that a dead flusher's entries move within ~1.5x CLAIM_IDLE_MS
        every = max(0.5, min(CLAIM_EVERY_SECONDS, self.settings.claim_idle_ms / 2000))
        if time.monotonic() - self._last_claim < every:
            return
        self._last_claim = time.monotonic()
        for consumer in self.consumers:
            await self._drain(consumer, consumer.claim_abandoned)

    async def _collect(self, consumer: Consumer) -> list[Entry]:
        """Read until a full batch or the flush interval, whichever comes first."""
        s = self.settings
        deadline = time.monotonic() + s.flush_interval_ms / 1000
        entries: list[Entry] = []
        events = 0
        # with several partitions a lane must not sit on one of them
        max_block = s.flush_interval_ms if len(self.consumers) == 1 else 50
        while events < s.flush_batch_size and not self.stopping.is_set():
            remaining_ms = min(max_block, int((deadline - time.monotonic()) * 1000))
            if remaining_ms <= 0:
                break
            # entries hold 1..1000 events: ask for as many as should fill the batch
            # at the sizes seen so far (never 100 entries of 1000 at once)
            # the first entry tells the size of the ones behind it
            wanted = self._entries_per_flush(s.flush_batch_size - events) if entries else 1
            got = await consumer.read_new(wanted, remaining_ms)
            if not got and (entries or len(self.consumers) > 1):
                break
            entries.extend(got)
            events += sum(e.count for e in got)
            if got:
                seen = sum(e.count for e in got) / len(got)
                self._entry_size = 0.8 * self._entry_size + 0.2 * seen
        return entries

    def _entries_per_flush(self, room: int | None = None) -> int:
        room = self.settings.flush_batch_size if room is None else room
        return max(1, min(ENTRIES_PER_READ, int(room / self._entry_size)))

    async def flush(self, consumer: Consumer, entries: list[Entry]) -> None:
        """Store the entries' events, then retire them; never returns having lost any."""
        batches: list[Batch] = []
        undecodable: list[Retirement] = []
        now = datetime.now(UTC)
        # read after the entries were delivered: see the module docstring
        erasures = await self._retry("read erasure tombstones", self.erasures.current)
        dropped: dict[str, int] = {}
        for entry in entries:
            try:
                events = decode_events(entry.body)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                at = int(now.timestamp() * 1000)
                undecodable.append(Retirement(entry, dead_reason=f"undecodable entry: {exc}",
                                              failure=Failure(1, at, at)))  # fmt: skip
                continue
            docs = [to_document(e, entry.batch_id, now) for e in events]
            if erasures:
                docs = _not_erased(erasures, entry, docs, dropped)
            batches.append(Batch(entry, docs, erasures))
        if dropped:
            await self._count_dropped(dropped)
        if undecodable:
            await self._retire(consumer, undecodable)
        if not batches:
            return
        try:
            await self._store_and_retire(consumer, batches)
        except Permanent:
            # isolate the bad entry so the others are not held back by it; the
            # failed write may have stored some of each, so they are read back
            for batch in batches:
                try:
                    await self._store_and_retire(consumer, [batch], tried=True)
                except Permanent as exc:
                    await self._count_failure(consumer, batch, str(exc))

    async def _store_and_retire(
        self, consumer: Consumer, batches: list[Batch], tried: bool = False
    ) -> None:
        started = time.perf_counter()
        docs = [d for b in batches for d in b.docs]
        first_attempt = not tried
        new: set[int] = set()

        async def insert() -> None:
            nonlocal first_attempt, new
            try:
                new = await self._insert(docs)
            except BaseException:
                first_attempt = False  # some may be in: read back what each entry stored
                raise

        await self._retry("insert", insert)
        retirements: list[Retirement] = []
        counted: list[list[Document]] = []
        offset = 0
        for batch in batches:
            if first_attempt and not batch.entry.redelivered:
                stored = [d for i, d in enumerate(batch.docs, offset) if i in new]
            else:
                stored = await self._retry("read back", partial(self._read_back, batch.entry))
                if batch.erasures:  # stored by an attempt made before an erasure began
                    stored = await self._erase_stored(batch, stored)
            retirements.append(Retirement(batch.entry, tails_of(stored)))
            counted.append(stored)
            offset += len(batch.docs)
        retired = await self._retire(consumer, retirements)
        # whoever retires an entry counts it, and shows it to /stream's watchers
        await self._show([d for docs, ok in zip(counted, retired, strict=True) if ok
                          for d in docs])  # fmt: skip
        metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
        metrics.FLUSH_BATCH_EVENTS.observe(len(docs))
        stored_here = sum(len(d) for d, ok in zip(counted, retired, strict=True) if ok)
        metrics.EVENTS_STORED.inc(stored_here)
        metrics.EVENTS_DUPLICATE.inc(max(0, len(docs) - stored_here))
        for batch in batches:
            self._failures.pop(batch.entry.batch_id, None)

    async def _show(self, docs: list[Document]) -> None:
        try:
            await self.live.publish(docs)
        except REDIS_ERRORS as exc:  # a watcher misses them; nothing else does
            log.debug("could not publish stored events to /stream watchers: %s", exc)

    async def _erase_stored(self, batch: Batch, stored: list[Document]) -> list[Document]:
        """Delete what an erasure's tombstone matches of the events an earlier attempt at
        this entry stored (uncounted: the entry was never acknowledged); the rest. (They
        were counted as kept out when the entry's events were checked.)"""
        dropped: dict[str, int] = {}
        kept = _not_erased(batch.erasures, batch.entry, stored, dropped)
        if dropped:
            kept_ids = {(d["account_id"], d["event_id"]) for d in kept}
            gone = [storage_id(d["account_id"], d["event_id"]) for d in stored
                    if (d["account_id"], d["event_id"]) not in kept_ids]  # fmt: skip
            events = store.events(self.db)
            for doc_id in gone:  # by _id equality: what FerretDB serves from an index
                await self._retry("delete an erased event",
                                  partial(events.delete_one, {"_id": doc_id}))  # fmt: skip
        return kept

    async def _count_dropped(self, per_run: dict[str, int]) -> None:
        metrics.ERASED_QUEUED.inc(sum(per_run.values()))
        try:
            await self.erasures.count_dropped(per_run)
        except REDIS_ERRORS as exc:  # a figure in the erasure's report; nothing else
            log.debug("could not count events kept out by erasures: %s", exc)

    async def _insert(self, docs: list[Document]) -> set[int]:
        try:
            return await store.insert_new(store.events(self.db), docs)
        except BulkWriteError as exc:
            errors = [e for e in exc.details.get("writeErrors", [])
                      if e.get("code") != store.DUPLICATE_KEY]  # fmt: skip
            reason = errors[0].get("errmsg", str(exc)) if errors else str(exc)
            raise Permanent(f"MongoDB refused the write: {reason}") from exc
        except (PyMongoError, ValueError, TypeError, OverflowError) as exc:
            if store.is_transient(exc):
                raise
            raise Permanent(f"MongoDB refused the write: {exc}") from exc

    async def _read_back(self, entry: Entry) -> list[Document]:
        """The events stored under this entry, by whichever attempt stored them."""
        found = store.events(self.db).find({"batch": entry.batch_id}, READ_BACK_FIELDS)
        return await found.to_list(None)

    async def _retire(self, consumer: Consumer, retirements: list[Retirement]) -> list[bool]:
        retired = await self._retry("acknowledge", lambda: consumer.retire(retirements))
        for r, ok in zip(retirements, retired, strict=True):
            if not ok:
                metrics.ENTRIES_CLAIMED_AWAY.inc()
                log.warning("entry %s was claimed by another flusher meanwhile; it counts it",
                            r.entry.batch_id)  # fmt: skip
            elif r.dead_reason:
                metrics.DEAD_LETTERED.inc()
                log.error("entry %s moved to %s: %s", r.entry.batch_id, consumer.partition.dead,
                          r.dead_reason)  # fmt: skip
        return retired

    async def _count_failure(self, consumer: Consumer, batch: Batch, reason: str) -> None:
        key = batch.entry.batch_id
        now = int(time.time() * 1000)
        attempts, first = self._failures.get(key, (0, now))
        attempts += 1
        self._failures[key] = (attempts, first)
        metrics.FLUSH_ERRORS.labels("permanent").inc()
        log.warning("entry %s failed (%d/%d): %s", key, attempts,
                    self.settings.dead_letter_after, reason)  # fmt: skip
        if attempts < self.settings.dead_letter_after:
            await asyncio.sleep(min(MAX_BACKOFF, 0.1 * 2**attempts))
            return
        # whatever of it did get stored still counts: read it back
        stored = await self._retry("read back", lambda: self._read_back(batch.entry))
        if batch.erasures:
            stored = await self._erase_stored(batch, stored)
        accounts = ",".join(sorted({d["account_id"] for d in batch.docs}))
        failure = Failure(attempts, first, now, accounts)
        entry = _dead_letter_body(batch)  # a replay must not bring erased events back
        await self._retire(consumer, [Retirement(entry, tails_of(stored), reason, failure)])
        self._failures.pop(key, None)

    async def _retry(self, what: str, action: Callable[[], Awaitable[T]]) -> T:
        """Run until it succeeds; transient server errors only cost time.

        While stopping, give up after the shutdown grace: what is not
        acknowledged stays pending in the stream and the next start recovers it.
        """
        delay = 0.1
        give_up_at: float | None = None
        while True:
            if self.stopping.is_set():
                give_up_at = give_up_at or time.monotonic() + self.settings.shutdown_grace_seconds
                if time.monotonic() >= give_up_at:
                    raise StoppedWhileRetrying(what)
            try:
                return await action()
            except TRANSIENT_REDIS as exc:
                problem = f"{type(exc).__name__}: {exc}"
            except PyMongoError as exc:
                if not store.is_transient(exc):
                    raise
                problem = f"{type(exc).__name__}: {exc}"
            metrics.FLUSH_ERRORS.labels("transient").inc()
            log.warning("%s failed (%s); retrying in %.1fs", what, problem, delay)
            await asyncio.sleep(delay)
            delay = min(MAX_BACKOFF, delay * 2)


def _not_erased(
    erasures: Matcher, entry: Entry, docs: list[Document], dropped: dict[str, int]
) -> list[Document]:
    """The documents no erasure's tombstone matches; counts the others per erasure run."""
    queued = queued_ms(entry.entry_id)
    kept = []
    for doc in docs:
        rule = erasures.erases(queued, doc["account_id"], doc["user_id"], ms(doc["timestamp"]))
        if rule is None:
            kept.append(doc)
        else:
            dropped[rule.run] = dropped.get(rule.run, 0) + 1
    return kept


def _dead_letter_body(batch: Batch) -> Entry:
    """The entry as a dead letter keeps it: without the events erasures keep out (its
    count stays, which the depth counter goes by when it is replayed and stored)."""
    if not batch.erasures:
        return batch.entry
    queued, erases = queued_ms(batch.entry.entry_id), batch.erasures.erases
    events = decode_events(batch.entry.body)
    kept = [e for e in events if erases(queued, e.account_id, e.user_id, ms(e.timestamp)) is None]
    if len(kept) == len(events):
        return batch.entry
    return replace(batch.entry, body=encode_events(kept))


def tails_of(docs: list[Document]) -> dict[str, tail.TailEvents]:
    """Stored event documents as tail events, per account."""
    per_account: dict[str, tail.TailEvents] = {}
    for doc in docs:
        events = per_account.get(doc["account_id"])
        if events is None:
            events = per_account[doc["account_id"]] = tail.TailEvents([], [], [])
        events.ts.append(ms(doc["timestamp"]))
        events.types.append(doc["type"])
        events.users.append(doc["user_id"])
    return per_account


def flusher_process(settings: Settings, slot: int = 0) -> None:
    """Entry point of a managed ``flusher`` process."""
    run_worker(Flusher.role, lambda: Flusher(settings, slot), settings)
