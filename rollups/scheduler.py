"""The ``rollups`` process: an APScheduler job every few seconds, under a Redis lease.

Only the lease holder runs; a second instance (another host) keeps trying and
takes over when the lease expires. Overlap is harmless anyway: buckets are
replaced only by a newer watermark and the watermark only moves forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from datetime import UTC, datetime

import redis.asyncio as aioredis
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError
from redis.exceptions import RedisError

from rollups import jobs
from rollups import store as rollup_store
from rollups.buckets import Document
from service import metrics, queue, store
from service.config import Settings
from service.processes import run_process, stop_on_signals

log = logging.getLogger("rollups.scheduler")

RETENTION_EVERY_SECONDS = 600.0
SHUTDOWN_GRACE_SECONDS = 10.0

# KEYS: lease; ARGV: token, ttl ms. Take it if free, extend it if ours.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    def __init__(self, client: aioredis.Redis, key: str, ttl_seconds: float) -> None:
        self._client = client
        self.key = key
        self.token = f"{socket.gethostname()}:{uuid.uuid4().hex}"
        self._ttl_ms = int(ttl_seconds * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)

    async def hold(self) -> bool:
        return bool(await self._acquire(keys=[self.key], args=[self.token, self._ttl_ms]))

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.token])


def lease_key(settings: Settings) -> str:
    return f"{settings.mongo_db}:rollups:lease"


class RollupRunner:
    def __init__(self, db: AsyncDatabase[Document], lease: Lease, settings: Settings) -> None:
        self._db = db
        self._lease = lease
        self._settings = settings
        self._last_retention = 0.0
        self.running = asyncio.Lock()  # held during a run, so shutdown can wait for it

    async def tick(self) -> None:
        async with self.running:
            await self._tick()

    async def _tick(self) -> None:
        try:
            if not await self._lease.hold():
                return
            started = time.monotonic()
            result = await jobs.run_once(self._db, self._settings)
            took = time.monotonic() - started
            await self._expire_if_due()
        except (PyMongoError, RedisError, OSError) as exc:
            metrics.ROLLUP_RUNS.labels("error").inc()
            log.warning("rollup run failed (%s); the next run redoes it", exc)
            return
        if result is None:
            metrics.ROLLUP_RUNS.labels("idle").inc()
            return
        metrics.ROLLUP_RUNS.labels("ok").inc()
        if took > self._settings.rollup_interval_seconds:
            # summaries stay exact meanwhile (live tail), but slower: say so
            log.info(
                "rollup run up to %s took %.1f s (%d minute, %d hour buckets)",
                result.watermark.isoformat(),
                took,
                result.minute_buckets,
                result.hour_buckets,
            )
        metrics.ROLLUP_BUCKETS.labels("minute").inc(result.minute_buckets)
        metrics.ROLLUP_BUCKETS.labels("hour").inc(result.hour_buckets)

    async def _expire_if_due(self) -> None:
        if time.monotonic() - self._last_retention < RETENTION_EVERY_SECONDS:
            return
        self._last_retention = time.monotonic()
        await jobs.expire_buckets(self._db, self._settings, datetime.now(UTC))


async def serve(settings: Settings) -> None:
    stop = stop_on_signals()
    loop = asyncio.get_running_loop()
    redis = queue.connect(settings.redis_url)
    mongo = store.connect(settings, settings.rollup_timeout_seconds)
    db = store.database(mongo, settings)
    # long enough to cover a normal run; an overrun only means a harmless overlap
    lease = Lease(redis, lease_key(settings), max(10.0, 5 * settings.rollup_interval_seconds))
    runner = RollupRunner(db, lease, settings)
    scheduler = AsyncIOScheduler(event_loop=loop, timezone=UTC)
    try:
        while not stop.is_set():
            try:
                await rollup_store.ensure_indexes(db)
                break
            except PyMongoError as exc:
                log.warning("cannot create rollup indexes yet (%s); retrying", exc)
                await asyncio.sleep(1)
        scheduler.add_job(
            runner.tick,
            "interval",
            seconds=settings.rollup_interval_seconds,
            next_run_time=datetime.now(UTC),
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            id="rollups",
        )
        scheduler.start()
        await stop.wait()
    finally:
        if scheduler.running:
            scheduler.shutdown(wait=False)
        try:  # let a run in progress finish before its connections close
            await asyncio.wait_for(runner.running.acquire(), SHUTDOWN_GRACE_SECONDS)
        except TimeoutError:
            log.warning("a rollup run was still going at shutdown; the next start redoes it")
        with contextlib.suppress(RedisError):
            await lease.release()
        await redis.aclose()
        await mongo.close()


def rollups_process(settings: Settings) -> None:
    """Entry point of the managed ``rollups`` process."""
    run_process("rollups", serve(settings))
