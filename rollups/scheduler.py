"""The ``rollups`` process: APScheduler jobs under a Redis lease.

- ``roll`` (every ``ROLLUP_INTERVAL_SECONDS``): when a new minute has begun,
  roll every account that is due to it: those with tail entries (the dirty
  sets the flushers maintain) and those a bucket is about to leave a window of
  (a schedule in Redis, scored by that minute). Between minute boundaries it
  has nothing to do: summaries read the tail meanwhile.
- ``retention`` (every minute): delete expired raw events and buckets, and the
  tombstones of finished erasures nothing queued can match any more.

The clock is the Redis server's (TIME), shared with every summary, so a head
is never ahead of a reader's minute. Only the lease holder works; another
instance (on another host) takes over when the lease lapses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from bson.errors import InvalidDocument
from pymongo import ASCENDING, DESCENDING
from pymongo.errors import PyMongoError

from core import keys, metrics, store
from core.buckets import floor
from core.connections import REDIS_ERRORS
from core.erasure import prune_tombstones
from core.settings import Settings
from core.store import Database
from core.tail import redis_time_ms
from core.worker import Worker, run_worker
from rollups.lease import Lease
from rollups.reschedule import reschedule_if_lost
from rollups.retention import Retention
from rollups.rollover import HeadConflict, Roller, next_change
from rollups.sweep import Sweep, schedule_retired

log = logging.getLogger(__name__)

RETENTION_EVERY_SECONDS = 60.0
CONCURRENT_ACCOUNTS = 4
RENEW_LEASE_EVERY = 50  # accounts


async def ensure_rollup_indexes(db: Database) -> None:
    for name in (keys.MINUTES, keys.HOURS):
        await db[name].create_index([("start", ASCENDING)])  # retention
    await db[keys.HOURS].create_index([("account_id", ASCENDING)])  # time series
    await db[keys.HEADS].create_index([("account_id", ASCENDING), ("version", DESCENDING)])


class RollupsProcess(Worker):
    role = "rollups"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, settings.rollup_timeout_seconds)
        ttl = max(10.0, 5 * settings.rollup_interval_seconds)
        self.lease = Lease(self.redis, keys.lease(settings), ttl, "rollups")
        self.roller = Roller(self.db, self.redis, settings)
        self.retention: Retention | None = None
        self.rolled_minute: int | None = None
        self.held = False
        self.busy = asyncio.Lock()  # one job at a time, and shutdown waits for it

    async def startup(self) -> None:
        await ensure_rollup_indexes(self.db)
        has_ttl = await store.ensure_event_indexes(self.db, self.settings)
        self.retention = Retention(self.db, self.settings, raw_by_delete=not has_ttl)

    async def main(self) -> None:
        scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop(), timezone=UTC)
        common = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None,
                  "next_run_time": datetime.now(UTC)}  # fmt: skip
        scheduler.add_job(self.roll, "interval", seconds=self.settings.rollup_interval_seconds,
                          id="roll", **common)  # fmt: skip
        scheduler.add_job(self.expire, "interval", seconds=RETENTION_EVERY_SECONDS,
                          id="retention", **common)  # fmt: skip
        scheduler.start()
        try:
            await self.stopping.wait()
        finally:
            scheduler.shutdown(wait=False)
            async with self.busy:  # let a job in progress finish (within the grace)
                pass

    async def shutdown(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            await self.lease.release()

    async def _lead(self) -> bool:
        """Whether this process holds the lease; forget cached heads after a gap.

        A backfill or an erasure that asks for the lease gets it: this process lets go
        and stays off while it is wanted (``rollups/lease.py``)."""
        if await self.lease.wanted_elsewhere():
            if self.held:
                log.info("handing the rollups lease to a backfill or erasure that asked")
            await self.lease.release()
            held = False
        else:
            held = await self.lease.hold()
        if held and not self.held:
            self.roller.forget_heads()
            self.rolled_minute = None
        self.held = held
        return held

    async def roll(self) -> None:
        async with self.busy:
            try:
                if self.stopping.is_set() or not await self._lead():
                    return
                minute = floor(redis_time_ms(await self.redis.time()), "minute")
                await reschedule_if_lost(self.db, self.redis, self.settings)
                if minute == self.rolled_minute:
                    metrics.ROLLUP_RUNS.labels("idle").inc()
                    return
                started = time.monotonic()
                rolled, failed = await self.roll_due(minute)
            except (PyMongoError, *REDIS_ERRORS) as exc:
                metrics.ROLLUP_RUNS.labels("error").inc()
                log.warning("rollover pass failed (%s); the next run redoes it", exc)
                return
            took = time.monotonic() - started
            metrics.ROLLUP_SECONDS.observe(took)
            metrics.ROLLUP_RUNS.labels("ok" if not failed else "partial").inc()
            if not failed:
                self.rolled_minute = minute
                await self.redis.set(keys.rollup_progress(self.settings), minute)
            if rolled or failed:
                log.info("rolled %d accounts to %s in %.2f s (%d failed, retried next run)",
                         rolled, datetime.fromtimestamp(minute / 1000, UTC).strftime("%H:%M"),
                         took, failed)  # fmt: skip

    async def due_accounts(self, minute: int) -> set[str]:
        due: set[str] = set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in keys.partitions(self.settings):
                pipe.smembers(part.dirty)
            pipe.zrangebyscore(keys.rollup_schedule(self.settings), "-inf", minute)
            replies = await pipe.execute()
        for reply in replies:
            due.update(a.decode() for a in reply)
        return due

    async def roll_due(self, minute: int) -> tuple[int, int]:
        """Roll every due account to ``minute``; (rolled, failed) counts."""
        accounts = sorted(await self.due_accounts(minute))
        gate = asyncio.Semaphore(CONCURRENT_ACCOUNTS)
        rolled = failed = 0

        async def one(account: str) -> None:
            nonlocal rolled, failed
            async with gate:
                try:
                    if await self.roll_account(account, minute):
                        rolled += 1
                except HeadConflict:
                    failed += 1
                    metrics.ROLLUP_ACCOUNT_FAILURES.labels("conflict").inc()
                    log.info("account %s was rolled by another job; retried next run", account)
                except (PyMongoError, InvalidDocument, LookupError, ValueError,
                        *REDIS_ERRORS) as exc:  # fmt: skip
                    # one account's failure (a store error, or a document past MongoDB's
                    # 16 MiB: docs/OPERATIONS.md, the limits of one account) never stops
                    # the others; its tail keeps its events, so its figures stay exact
                    failed += 1
                    metrics.ROLLUP_ACCOUNT_FAILURES.labels(type(exc).__name__).inc()
                    log.warning("rolling account %s failed: %s", account, exc)

        for start in range(0, len(accounts), RENEW_LEASE_EVERY):
            if not await self._lead():
                log.warning("lost (or handed over) the rollups lease mid-pass; stopping this "
                            "pass")  # fmt: skip
                return rolled, failed + len(accounts) - start
            await asyncio.gather(*(one(a) for a in accounts[start : start + RENEW_LEASE_EVERY]))
        return rolled, failed

    async def roll_account(self, account: str, minute: int) -> bool:
        result = await self.roller.roll(account, minute)
        if result is not None:
            await schedule_retired(self.redis, self.settings, result.head)
        head = result.head if result else await self.roller.head(account)
        schedule = keys.rollup_schedule(self.settings)
        due = next_change(head)
        if due is None:
            await self.redis.zrem(schedule, account)
        else:
            await self.redis.zadd(schedule, {account: due})
        if result is None:
            return False
        metrics.ROLLUP_ACCOUNTS.inc()
        for kind, n in result.documents.items():
            metrics.ROLLUP_DOCUMENTS.labels(kind).inc(n)
        return True

    async def expire(self) -> None:
        async with self.busy:
            try:
                if self.stopping.is_set() or self.retention is None or not await self._lead():
                    return
                now = redis_time_ms(await self.redis.time())
                await self.retention.sweep(now)
                await Sweep(self.db, self.redis, self.settings).run()
                # finished erasures' tombstones the queue has moved past (core/erasure.py)
                await prune_tombstones(self.db, self.redis, self.settings)
            except (PyMongoError, *REDIS_ERRORS) as exc:
                log.warning("retention sweep failed (%s); the next one goes on", exc)


def rollups_process(settings: Settings) -> None:
    """Entry point of the managed ``rollups`` process."""
    run_worker(RollupsProcess.role, lambda: RollupsProcess(settings), settings)
