"""The flusher: stream entries in, raw events out to MongoDB, ack after the write.

Exactly-once storage comes from two facts: an entry is acknowledged only after
its events are in MongoDB, and the write is idempotent (``_id`` is
``account_id|event_id``, duplicate-key errors count as success). So any crash
or outage at any point means a redo, never a loss or a double count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import msgspec
import pymongo
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    ConnectionFailure,
    ExecutionTimeout,
    NetworkTimeout,
    PyMongoError,
    ServerSelectionTimeoutError,
    WTimeoutError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import metrics, queue, store
from service.config import Settings
from service.events import decode_events, to_document
from service.processes import run_process, stop_on_signals
from service.queue import Consumer, Entry
from service.store import Document

log = logging.getLogger("service.flusher")

TRANSIENT_MONGO = (
    AutoReconnect,
    ConnectionFailure,
    ExecutionTimeout,
    NetworkTimeout,
    ServerSelectionTimeoutError,
    WTimeoutError,
)
TRANSIENT_REDIS = (RedisConnectionError, RedisTimeoutError, OSError)
MAX_BACKOFF = 5.0
SHUTDOWN_GRACE_BACKOFF = 1.6  # ~3 s of retries after a stop request
RETENTION_SWEEP_SECONDS = 600.0
CLAIM_EVERY_SECONDS = 5.0
RECENT_PRUNE_SECONDS = 30.0
HOUSEKEEPING_TIMEOUT_SECONDS = 300.0

T = TypeVar("T")


class Flusher:
    def __init__(
        self,
        consumer: Consumer,
        events: AsyncCollection[Document],
        settings: Settings,
        stop: asyncio.Event,
    ) -> None:
        self._consumer = consumer
        self._events = events
        self._settings = settings
        self._stop = stop
        self._failures: dict[bytes, int] = {}
        self._ttl_index = False
        self._last_claim = 0.0

    async def run(self) -> None:
        try:
            await self._run()
        except _StoppedWhileRetrying as exc:
            log.warning("stopped while retrying %s; unacknowledged entries stay queued", exc)

    async def _run(self) -> None:
        await self._retry("start-up", self._prepare)
        # deletes can take seconds on a big collection; they must not stall flushing
        housekeeping = asyncio.create_task(self._housekeep())
        try:
            await self._drain(self._consumer.read_own_pending)
            while not self._stop.is_set():
                await self._claim_if_due()
                entries = await self._retry("read", self._collect)
                if entries:
                    await self.flush(entries)
        finally:
            housekeeping.cancel()
        log.info("flusher stopped cleanly")

    async def _prepare(self) -> None:
        await self._consumer.ensure_group()
        db = self._events.database
        self._ttl_index = await store.ensure_event_indexes(db, self._settings)
        # before the first write: readers trust events_recent only from here on
        await store.mark_recent_copy(db, self._settings.recent_copy, datetime.now(UTC))

    async def _drain(self, read: Callable[[int], Awaitable[list[Entry]]]) -> None:
        """Flush what an earlier run (or a dead consumer) left unacknowledged."""
        while not self._stop.is_set():
            entries = await self._retry("read pending", lambda: read(self._entries_per_read(0)))
            if not entries:
                return
            log.info("recovering %d unacknowledged stream entries", len(entries))
            await self.flush(entries)

    async def _claim_if_due(self) -> None:
        if time.monotonic() - self._last_claim < CLAIM_EVERY_SECONDS:
            return
        self._last_claim = time.monotonic()
        await self._drain(self._consumer.claim_abandoned)

    async def _collect(self) -> list[Entry]:
        """Read until a full batch or the flush interval, whichever comes first."""
        s = self._settings
        deadline = time.monotonic() + s.flush_interval_ms / 1000
        entries: list[Entry] = []
        events = 0
        while events < s.flush_batch_size and not self._stop.is_set():
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            got = await self._consumer.read_new(self._entries_per_read(events), remaining_ms)
            if not got and entries:
                break
            entries.extend(got)
            events += sum(e.count for e in got)
        return entries

    def _entries_per_read(self, events_so_far: int) -> int:
        return max(1, min(100, self._settings.flush_batch_size - events_so_far))

    async def flush(self, entries: list[Entry]) -> None:
        """Store the entries' events, then ack them; never returns having lost any."""
        good, docs_by_entry, bad = self._decode(entries)
        for entry, reason in bad:
            await self._dead_letter(entry, reason)
        if not good:
            return
        try:
            await self._write_and_ack(good, docs_by_entry)
        except _Permanent as exc:
            if len(good) == 1:
                await self._count_failure(good[0], exc.reason)
                return
            # isolate the bad entry so the others are not held back by it
            for entry in good:
                try:
                    await self._write_and_ack([entry], docs_by_entry)
                except _Permanent as single:
                    await self._count_failure(entry, single.reason)

    def _decode(
        self, entries: list[Entry]
    ) -> tuple[list[Entry], dict[bytes, list[Document]], list[tuple[Entry, str]]]:
        good: list[Entry] = []
        docs: dict[bytes, list[Document]] = {}
        bad: list[tuple[Entry, str]] = []
        now = datetime.now(UTC)
        for entry in entries:
            try:
                events = decode_events(entry.body)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                bad.append((entry, f"undecodable entry: {exc}"))
                continue
            docs[entry.entry_id] = [to_document(e, now) for e in events]
            good.append(entry)
        return good, docs, bad

    async def _write_and_ack(
        self, entries: list[Entry], docs_by_entry: dict[bytes, list[Document]]
    ) -> None:
        docs = [d for e in entries for d in docs_by_entry[e.entry_id]]
        started = time.perf_counter()
        inserted = await self._retry("insert", lambda: self._insert(docs))
        await self._retry("ack", lambda: self._consumer.acknowledge(entries))
        metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
        metrics.FLUSH_BATCH_EVENTS.observe(len(docs))
        metrics.EVENTS_STORED.inc(inserted)
        metrics.EVENTS_DUPLICATE.inc(len(docs) - inserted)
        for entry in entries:
            self._failures.pop(entry.entry_id, None)

    async def _insert(self, docs: list[Document]) -> int:
        # a fresh ingested_at per attempt: a retried write must not land
        # behind the rollup watermark it was stamped for
        now = datetime.now(UTC)
        for doc in docs:
            doc["ingested_at"] = now
        try:
            inserted = await store.insert_events(self._events, docs)
            if self._settings.recent_copy:
                await store.insert_events(store.recent(self._events.database), docs)
            return inserted
        except TRANSIENT_MONGO:
            raise
        except BulkWriteError as exc:
            errors = [e for e in exc.details.get("writeErrors", [])
                      if e.get("code") != store.DUPLICATE_KEY]  # fmt: skip
            reason = errors[0].get("errmsg", str(exc)) if errors else str(exc)
            raise _Permanent(f"MongoDB refused the write: {reason}") from exc
        except (PyMongoError, ValueError, TypeError, OverflowError) as exc:
            if _is_transient(exc):
                raise
            raise _Permanent(f"MongoDB refused the write: {exc}") from exc

    async def _count_failure(self, entry: Entry, reason: str) -> None:
        attempts = self._failures.get(entry.entry_id, 0) + 1
        self._failures[entry.entry_id] = attempts
        metrics.FLUSH_ERRORS.labels("permanent").inc()
        log.warning(
            "entry %s failed (%d/%d): %s",
            entry.entry_id,
            attempts,
            self._settings.dead_letter_after,
            reason,
        )
        if attempts >= self._settings.dead_letter_after:
            await self._dead_letter(entry, reason)
            self._failures.pop(entry.entry_id, None)
        else:
            await asyncio.sleep(min(MAX_BACKOFF, 0.1 * 2**attempts))

    async def _dead_letter(self, entry: Entry, reason: str) -> None:
        await self._retry("dead-letter", lambda: self._consumer.dead_letter(entry, reason))
        metrics.DEAD_LETTERED.inc()
        log.error(
            "entry %s moved to %s: %s", entry.entry_id, self._settings.dead_letter_key, reason
        )

    async def _retry(self, what: str, action: Callable[[], Awaitable[T]]) -> T:
        """Run until it succeeds; transient server errors only cost time.

        While stopping, give up after a grace period: what is not acknowledged
        stays pending in the stream and the next start recovers it.
        """
        delay = 0.1
        while True:
            if self._stop.is_set() and delay >= SHUTDOWN_GRACE_BACKOFF:
                raise _StoppedWhileRetrying(what)
            try:
                return await action()
            except (*TRANSIENT_MONGO, *TRANSIENT_REDIS) as exc:
                metrics.FLUSH_ERRORS.labels("transient").inc()
                log.warning(
                    "%s failed (%s: %s); retrying in %.1fs", what, type(exc).__name__, exc, delay
                )
            except PyMongoError as exc:
                if not _is_transient(exc):
                    raise
                metrics.FLUSH_ERRORS.labels("transient").inc()
                log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(MAX_BACKOFF, delay * 2)

    async def _housekeep(self) -> None:
        """Prune ``events_recent``; expire raw events where there is no TTL index."""
        last_sweep = -RETENTION_SWEEP_SECONDS  # the first round sweeps
        while True:
            await asyncio.sleep(RECENT_PRUNE_SECONDS)
            now = datetime.now(UTC)
            await self._delete(
                "pruning events_recent", store.prune_recent, self._events.database, now
            )
            if self._ttl_index or time.monotonic() - last_sweep < RETENTION_SWEEP_SECONDS:
                continue
            last_sweep = time.monotonic()
            cutoff = now - timedelta(days=self._settings.raw_retention_days)
            deleted = await self._delete(
                "retention sweep", store.delete_expired_events, self._events, cutoff
            )
            if deleted:
                log.info("retention: deleted %d raw events older than %s", deleted, cutoff)

    async def _delete(
        self, what: str, delete: Callable[[T, datetime], Awaitable[int]], target: T, when: datetime
    ) -> int:
        try:
            # a longer deadline than the write path's: a scan of a big collection is slow
            with pymongo.timeout(HOUSEKEEPING_TIMEOUT_SECONDS):
                return await delete(target, when)
        except PyMongoError as exc:
            log.warning("%s failed: %s", what, exc)
            return 0


class _StoppedWhileRetrying(Exception):
    """Shutdown came while a server was unreachable; pending entries stay queued."""


class _Permanent(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _is_transient(exc: BaseException) -> bool:
    labels = getattr(exc, "has_error_label", None)
    if labels and (labels("RetryableWriteError") or labels("TransientTransactionError")):
        return True
    return isinstance(exc, TRANSIENT_MONGO)


async def serve(settings: Settings) -> None:
    stop = stop_on_signals()
    redis = queue.connect(settings.redis_url)
    mongo = store.connect(settings)
    try:
        coll = store.events(store.database(mongo, settings))
        await Flusher(Consumer(redis, settings), coll, settings, stop).run()
    finally:
        await redis.aclose()
        await mongo.close()


def flusher_process(settings: Settings) -> None:
    """Entry point of the managed ``flusher`` process."""
    run_process("flusher", serve(settings))
