"""The ``rollups`` process: APScheduler jobs over the rollup partitions it holds.

- ``leases`` (every ``ROLLUP_INTERVAL_SECONDS``): the partitions' leases
  (``rollups/lease.py``): renew them, give back those past this process's share
  or asked for by a backfill or an erasure, take free ones up to the share.
- ``roll`` (every ``ROLLUP_INTERVAL_SECONDS``): when a new minute has begun,
  roll every due account of each partition held to it, in batches
  (``rollups/batch.py``): those with tail entries (the dirty sets the flushers
  keep per rollup partition, in each stream partition) and those a bucket is
  about to leave a window of (a schedule per partition, scored by that minute).
  Between minute boundaries it has nothing to do: summaries read the tail
  meanwhile. A partition taken over is rolled at once, from the store's heads.
- ``retention`` (every minute): the holder of partition 0 deletes expired raw
  events and buckets, sweeps dead passes' drafts and deletes the tombstones of
  finished erasures nothing queued can match any more; each process retires what
  its partitions' idle accounts superseded (``rollups/sweep.py``).

The clock is the Redis server's (TIME), shared with every summary, so a head
is never ahead of a reader's minute. Several processes, on one or many hosts,
share the partitions; one that dies has its partitions taken over within the
lease's TTL, and one that lost a partition without knowing it (paused, cut off)
cannot publish a head over its successor's (fencing: ``rollups/lease.py``).

Changing ``ROLLUP_PARTITIONS`` moves accounts to other partitions: each pass
moves an account it finds in a set of its partition that is no longer its own to
the right one, and the holder of partition 0 drains the sets of the layouts used
before (the largest count ever used is kept in Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler
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
from rollups.batch import Outcome, roll_accounts
from rollups.lease import Leases
from rollups.reschedule import reschedule_if_lost
from rollups.retention import Retention
from rollups.rollover import Roller
from rollups.sweep import Sweep

log = logging.getLogger(__name__)

RETENTION_EVERY_SECONDS = 60.0
PARTITIONS_AT_ONCE = 2  # held partitions a pass rolls at the same time

# Keep the largest ROLLUP_PARTITIONS any process ran with. KEYS: layouts; ARGV: count
_LAYOUT = """
local seen = tonumber(redis.call('GET', KEYS[1]) or '0')
if seen < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) return tonumber(ARGV[1]) end
return seen
"""


async def ensure_rollup_indexes(db: Database) -> None:
    for name in (keys.MINUTES, keys.HOURS):
        # retention (by start), and a pass's read-ahead (by start in one rollup partition)
        await db[name].create_index([("start", ASCENDING), ("rollup_partition", ASCENDING)])
        if "start_1" in await db[name].index_information():  # the index of before
            await db[name].drop_index("start_1")
    await db[keys.HOURS].create_index([("account_id", ASCENDING)])  # time series
    await db[keys.HEADS].create_index([("account_id", ASCENDING), ("version", DESCENDING)])
    for name in (keys.MINUTES, keys.WINDOWS, keys.INDEXES):
        await db[name].create_index([("account_id", ASCENDING)])  # retiring, by account


class RollupsProcess(Worker):
    role = "rollups"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, settings.rollup_timeout_seconds)
        ttl = max(10.0, 5 * settings.rollup_interval_seconds)
        self.leases = Leases(self.redis, settings, "rollups", ttl)
        self.roller = Roller(self.db, self.redis, settings, fence=self.leases.held)
        self.retention: Retention | None = None
        self.rolled: dict[int, int] = {}  # partition -> the minute its last full pass reached
        self.rolling: set[int] = set()  # partitions a pass is working on
        self.asked: set[int] = set()  # held partitions a backfill or an erasure asks for
        self.busy = asyncio.Lock()  # one pass at a time, and shutdown waits for it
        # retention and sweeps: beside the passes (they never touch what a rollover
        # writes or needs), one at a time; shutdown waits for it too
        self.sweeping = asyncio.Lock()
        self._layouts = self.redis.register_script(_LAYOUT)
        self._pass: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        await ensure_rollup_indexes(self.db)
        has_ttl = await store.ensure_event_indexes(self.db, self.settings)
        self.retention = Retention(self.db, self.settings, raw_by_delete=not has_ttl)
        count = self.settings.rollup_partitions
        await self._layouts(keys=[keys.rollup_layouts(self.settings)], args=[count])

    async def main(self) -> None:
        scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop(), timezone=UTC)
        common = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None,
                  "next_run_time": datetime.now(UTC)}  # fmt: skip
        every = self.settings.rollup_interval_seconds
        scheduler.add_job(self.tick, "interval", seconds=every, id="leases", **common)
        scheduler.add_job(self._start_pass, "interval", seconds=every, id="roll", **common)
        scheduler.add_job(self.expire, "interval", seconds=RETENTION_EVERY_SECONDS,
                          id="retention", **common)  # fmt: skip
        scheduler.start()
        try:
            await self.stopping.wait()
        finally:
            scheduler.shutdown(wait=False)
            if self._pass is not None:  # let a pass in progress finish (within the grace)
                await asyncio.gather(self._pass, return_exceptions=True)
            async with self.busy, self.sweeping:
                pass

    async def shutdown(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            await self.leases.release()  # the others take them at their next tick
        metrics.ROLLUP_PARTITIONS_HELD.set(0)

    async def tick(self) -> None:
        """The leases' beat; a partition gained is rolled at once, from the store's heads
        (its previous holder may have written some since this process last held it)."""
        if self.stopping.is_set():
            return
        try:
            gained, lost = await self.leases.tick(busy=self.rolling)
            self.asked = await self.leases.wanted(self.leases.held)
        except REDIS_ERRORS as exc:
            log.warning("could not renew the rollup partitions' leases (%s)", exc)
            return
        if gained:
            self.roller.forget_heads(gained)
            for partition in gained:
                self.rolled.pop(partition, None)
        for partition in lost:
            self.rolled.pop(partition, None)
        if gained or lost:
            log.info("holding rollup partitions %s of %d (%d rollups processes)",
                     sorted(self.leases.held) or "none", self.settings.rollup_partitions,
                     self.leases.alive)  # fmt: skip
        metrics.ROLLUP_PARTITIONS_HELD.set(len(self.leases.held))

    async def _start_pass(self) -> None:
        """Start a pass unless one is running: a pass may take longer than the interval
        (the job returns at once, so the scheduler never has to skip one)."""
        if self._pass is None or self._pass.done():
            self._pass = asyncio.create_task(self.roll())

    def keeps(self, partition: int) -> bool:
        """Whether a pass over the partition may go on (still held, nobody asks for it)."""
        return partition in self.leases.held and partition not in self.asked

    async def roll(self) -> None:
        async with self.busy:
            try:
                if self.stopping.is_set() or not self.leases.held:
                    return
                minute = floor(redis_time_ms(await self.redis.time()), "minute")
                if 0 in self.leases.held:  # one process does what is not per partition
                    await reschedule_if_lost(self.db, self.redis, self.settings)
                todo = [p for p in sorted(self.leases.held) if self.rolled.get(p) != minute]
                if not todo:
                    metrics.ROLLUP_RUNS.labels("idle").inc()
                    return
                started = time.monotonic()
                rolled, failed = await self._roll_partitions(todo, minute)
            except (PyMongoError, *REDIS_ERRORS) as exc:
                metrics.ROLLUP_RUNS.labels("error").inc()
                log.warning("rollover pass failed (%s); the next run redoes it", exc)
                return
            took = time.monotonic() - started
            metrics.ROLLUP_RUNS.labels("ok" if not failed else "partial").inc()
            if rolled or failed:
                log.info("rolled %d accounts to %s in %.2f s (%d failed, retried next run)",
                         rolled, datetime.fromtimestamp(minute / 1000, UTC).strftime("%H:%M"),
                         took, failed)  # fmt: skip

    async def roll_due(self, minute: int) -> tuple[int, int]:
        """Roll every due account of the partitions this process holds (taking its share
        first if it holds none) to ``minute``; (rolled, failed) counts."""
        if not self.leases.held:
            await self.tick()
        return await self._roll_partitions(sorted(self.leases.held), minute)

    async def _roll_partitions(self, partitions: Iterable[int], minute: int) -> tuple[int, int]:
        """``PARTITIONS_AT_ONCE`` partitions at a time: one partition's read-ahead and last
        batches leave the store idle or the process waiting; another's fill the gap."""
        gate = asyncio.Semaphore(PARTITIONS_AT_ONCE)

        async def one(partition: int) -> Outcome | None:
            async with gate:
                if not self.keeps(partition):
                    return None
                return await self.roll_partition(partition, minute)

        try:
            async with asyncio.TaskGroup() as group:
                started = [group.create_task(one(p)) for p in partitions]
        except ExceptionGroup as failures:  # the first one, as a pass one by one raised it
            raise failures.exceptions[0] from None
        outcomes = [o for o in (task.result() for task in started) if o is not None]
        return sum(o.rolled for o in outcomes), sum(o.failed for o in outcomes)

    async def roll_partition(self, partition: int, minute: int) -> Outcome:
        """One partition's pass: every due account, in batches, while it is ours."""
        started = time.monotonic()
        self.rolling.add(partition)
        try:
            accounts = await self.due_accounts(partition, minute)
            outcome = await roll_accounts(self.roller, accounts, minute,
                                          lambda: self.keeps(partition))  # fmt: skip
        finally:
            self.rolling.discard(partition)
        took = time.monotonic() - started
        label = str(partition)
        metrics.ROLLUP_SECONDS.labels(label).observe(took)
        metrics.ROLLUP_PASS_ACCOUNTS.labels(label).observe(len(accounts))
        metrics.ROLLUP_ACCOUNTS.inc(outcome.rolled)
        for kind, n in outcome.documents.items():
            metrics.ROLLUP_DOCUMENTS.labels(kind).inc(n)
        if outcome.fenced or outcome.stopped:
            log.warning("stopped rolling partition %d: %s", partition,
                        "another process holds it now" if outcome.fenced
                        else "given up (lost, or asked for by a backfill or erasure)")  # fmt: skip
        elif not outcome.failed:
            self.rolled[partition] = minute
            await self.redis.set(keys.rollup_progress(self.settings, partition), minute)
        return outcome

    async def due_accounts(self, partition: int, minute: int) -> list[str]:
        """The partition's accounts with tail entries, or a bucket leaving a window by
        ``minute``; any found in its sets that belong to another partition (after a change
        of ``ROLLUP_PARTITIONS``) are moved to theirs."""
        s = self.settings
        parts = keys.partitions(s)
        dirty = [keys.dirty_set(s, part, partition) for part in parts]
        schedule = keys.rollup_schedule(s, partition)
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in dirty:
                pipe.smembers(name)
            pipe.zrangebyscore(schedule, "-inf", minute, withscores=True)
            replies = await pipe.execute()
        due: set[str] = set()
        moves = Moves(s)
        for part, name, members in zip(parts, dirty, replies, strict=False):
            for member in members:
                account = member.decode()
                if self.roller.partition_of(account) == partition:
                    due.add(account)
                else:
                    moves.dirty(name, part, account)
        for member, score in replies[-1]:
            account = member.decode()
            if self.roller.partition_of(account) == partition:
                due.add(account)
            else:
                moves.scored(schedule, account, score, keys.rollup_schedule)
        if partition == 0:
            await self._drain_other_layouts(moves)
        await moves.apply(self.redis)
        return sorted(due)

    async def _drain_other_layouts(self, moves: Moves) -> None:
        """Queue the moves of every member of the sets of the partition counts used before
        (``ROLLUP_PARTITIONS`` changed) to where it belongs now."""
        s = self.settings
        seen = int(await self.redis.get(keys.rollup_layouts(s)) or s.rollup_partitions)
        for other in keys.other_layout_sets(s, seen):
            if other.part is not None:  # a dirty set
                members: set[bytes] = await self.redis.smembers(other.key)  # type: ignore[assignment]
                for member in members:
                    moves.dirty(other.key, other.part, member.decode())
                continue
            route = keys.rollup_schedule if other.kind == "schedule" else keys.rollup_retire
            found: list[tuple[bytes, float]] = await self.redis.zrange(  # type: ignore[assignment]
                other.key, 0, -1, withscores=True
            )
            for member, score in found:
                # (retire members were "account|version" before rollup partitions)
                name = member.decode()
                moves.scored(other.key, name.partition("|")[0], score, route, name)

    async def expire(self) -> None:
        async with self.sweeping:
            try:
                if self.stopping.is_set() or self.retention is None or not self.leases.held:
                    return
                sweep = Sweep(self.db, self.redis, self.settings)
                if 0 in self.leases.held:  # one process does what is not per partition
                    now = redis_time_ms(await self.redis.time())
                    await self.retention.sweep(now)
                    await sweep.drafts(datetime.now(UTC))
                    # finished erasures' tombstones the queue has moved past (core/erasure.py)
                    await prune_tombstones(self.db, self.redis, self.settings)
                await sweep.retired(sorted(self.leases.held))
            except (PyMongoError, *REDIS_ERRORS) as exc:
                log.warning("retention sweep failed (%s); the next one goes on", exc)


class Moves:
    """Members of a partition's sets that belong to another partition, and where to."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    def dirty(self, key: str, part: keys.Partition, account: str) -> None:
        right = keys.account_dirty_set(self.settings, part, account)
        if right != key:
            self.calls += [("sadd", (right, account)), ("srem", (key, account))]

    def scored(self, key: str, account: str, score: float, route: Callable[[Settings, int], str],
               member: str | None = None) -> None:  # fmt: skip
        right = route(self.settings, keys.rollup_partition_of(self.settings, account))
        if right != key or (member is not None and member != account):
            self.calls += [("zadd", (right, {account: score})), ("zrem", (key, member or account))]

    async def apply(self, client: object) -> None:
        if not self.calls:
            return
        moved = len(self.calls) // 2
        async with client.pipeline(transaction=False) as pipe:  # type: ignore[attr-defined]
            for method, args in self.calls:
                getattr(pipe, method)(*args)
            await pipe.execute()
        log.info("moved %d accounts to their rollup partitions' sets", moved)


def rollups_process(settings: Settings) -> None:
    """Entry point of the managed ``rollups`` process."""
    run_worker(RollupsProcess.role, lambda: RollupsProcess(settings), settings)
