"""Backfill: make the buckets of a time range equal what the raw events say.

Hour by hour, for every account with raw events or buckets in the hour, it
recounts the raw events and compares them with what the rollups hold; a
difference becomes a signed correction that a rollover applies to the minute
and hour buckets and every window covering them. Running it again, or over a
range that is already right, finds no difference and writes nothing.

It runs as the rollup job (it asks for the leases of the rollup partitions it
touches: the account's, or all of them; the rollups processes hand them over at
their next tick, so their passes pause until it is done, and its rollovers write
under those leases' fencing tokens), and compares like with like while the
service keeps ingesting:

1. it rolls each account of the hour to the current minute, so the rollups
   hold every event acknowledged until then (``applied``);
2. it snapshots each stream partition atomically (one Lua call): the entries
   still pending, the last entry delivered to a flusher, and the accounts'
   tail entries after ``applied``;
3. it reads the raw events of the hour, leaving out those of entries pending
   or not yet delivered at the snapshot (not acknowledged yet: the tail will
   bring them); the rest must equal buckets + the snapshot's tail events.
   "Not yet delivered" is an entry id between the group's last delivered one and
   the stream's last generated one at the snapshot, or any id the stream made
   after it (the snapshot's Redis clock): ids of a stream that no longer exists
   (Redis lost, or restored from an older copy) are neither, so their events are
   counted, as they must be, and never taken for the queue's.

It refuses any range whose raw events may already have expired: recounting
there would replace good buckets with partial counts. It checkpoints each
finished hour, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from core import keys, store
from core.buckets import DAY, HOUR, MINUTE, Counts, Resolution, floor, ms, starts, to_datetime
from core.connections import Redis
from core.rollup_docs import read_packed
from core.settings import Settings
from core.store import Database
from core.tail import StreamId, parse_entries, parse_id, redis_time_ms
from rollups.lease import Leases
from rollups.rollover import Roller

# raw events younger than retention minus this margin are surely all still there
RAW_SAFETY_MARGIN = 2 * HOUR

# KEYS: stream, then tail keys; ARGV: group
# returns {pending ids}, last delivered id, last generated id, the clock, then the
# XRANGE of each tail key
_SNAPSHOT = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1000000)
local ids = {}
for i, p in ipairs(pending) do ids[i] = p[1] end
local delivered = '0-0'
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  if info['name'] == ARGV[1] then delivered = info['last-delivered-id'] end
end
local stream = redis.call('XINFO', 'STREAM', KEYS[1])
local generated = '0-0'
for i = 1, #stream, 2 do
  if stream[i] == 'last-generated-id' then generated = stream[i + 1] end
end
local out = {ids, delivered, generated, redis.call('TIME')}
for i = 2, #KEYS do out[i + 3] = redis.call('XRANGE', KEYS[i], '-', '+') end
return out
"""


class RangeRefused(ValueError):
    """The range reaches back past what raw retention guarantees, or is empty."""


@dataclass
class Report:
    hours_total: int
    hours_done: int = 0
    hours_skipped: int = 0
    events: int = 0
    accounts_corrected: int = 0
    minutes_corrected: int = 0


def raw_horizon(settings: Settings, now: int) -> int:
    """Raw events at or after this are surely all still stored."""
    return now - settings.raw_retention_days * DAY + RAW_SAFETY_MARGIN


def check_range(settings: Settings, start: datetime, end: datetime, now: datetime) -> None:
    if end <= start:
        raise RangeRefused("--to must be after --from")
    horizon = raw_horizon(settings, ms(now))
    if floor(ms(start), "hour") < horizon:
        earliest = to_datetime(floor(horizon, "hour") + HOUR)
        raise RangeRefused(
            f"refusing to backfill from {start.isoformat()}: raw events older than "
            f"{to_datetime(horizon).isoformat(timespec='minutes')} (raw retention "
            f"{settings.raw_retention_days} days minus a safety margin) may already have "
            "expired, and recounting them would overwrite good buckets with partial "
            f"counts. The earliest safe --from is {earliest.isoformat()}."
        )


def checkpoint_id(start: datetime, end: datetime, account: str | None) -> str:
    return f"{start.isoformat()}|{end.isoformat()}|{account or '*'}"


class Backfill:
    def __init__(self, db: Database, redis: Redis, settings: Settings) -> None:
        self.db = db
        self.redis = redis
        self.settings = settings
        self.lease = Leases(redis, settings, "backfill", settings.maintenance_lease_seconds)
        self.roller = Roller(db, redis, settings, fence=self.lease.held)
        self._snapshot = redis.register_script(_SNAPSHOT)

    async def run(
        self,
        start: datetime,
        end: datetime,
        account: str | None = None,
        dry_run: bool = False,
        progress: Callable[[Report], None] = lambda _: None,
        lease_timeout: float = 60.0,
    ) -> Report:
        check_range(self.settings, start, end, datetime.now(UTC))
        # the partitions it touches: the account's, or all of them; their holders hand
        # them over at their next tick (rollups/lease.py)
        partitions = ([keys.rollup_partition_of(self.settings, account)] if account
                      else range(self.settings.rollup_partitions))  # fmt: skip
        if not await self.lease.take(partitions, lease_timeout):
            raise RangeRefused("another backfill or an erasure holds the rollup partitions' "
                               "leases; try again later")  # fmt: skip
        try:
            return await self._run(start, end, account, dry_run, progress)
        finally:
            await self.lease.release()

    async def _run(
        self,
        start: datetime,
        end: datetime,
        account: str | None,
        dry_run: bool,
        progress: Callable[[Report], None],
    ) -> Report:
        hours = list(starts(floor(ms(start), "hour"), ms(end), "hour"))
        report = Report(hours_total=len(hours))
        cp_id = checkpoint_id(start, end, account)
        checkpoint = await self.db[keys.BACKFILLS].find_one({"_id": cp_id})
        done_through = checkpoint["done_through"] if checkpoint and not dry_run else None
        for hour in hours:
            if done_through is not None and hour <= done_through:
                report.hours_skipped += 1
            else:
                if not await self.lease.hold():
                    raise RangeRefused("lost a rollup partition's lease; run the backfill again")
                await self._hour(hour, account, dry_run, report)
                if not dry_run:
                    await self._checkpoint(cp_id, hour)
            report.hours_done += 1
            progress(report)
        if not dry_run:
            await self.db[keys.BACKFILLS].delete_one({"_id": cp_id})
        return report

    async def _checkpoint(self, cp_id: str, hour: int) -> None:
        await store.retry_duplicate_key(
            lambda: self.db[keys.BACKFILLS].update_one(
                {"_id": cp_id}, {"$set": {"done_through": hour}}, upsert=True
            )
        )

    async def _hour(self, hour: int, only: str | None, dry_run: bool, report: Report) -> None:
        accounts = await self._accounts(hour, only)
        if not accounts:
            return
        minute = floor(redis_time_ms(await self.redis.time()), "minute")
        for account in accounts:  # 1. the rollups hold everything acknowledged so far
            await self.roller.roll(account, minute)
        excluded, tails = await self._snapshot_all(accounts)  # 2.
        raw = await self._recount(hour, only, excluded, minute, report)  # 3.
        for account in accounts:
            corrections = await self._differences(account, hour, minute, raw[account],
                                                  tails[account])  # fmt: skip
            if not corrections:
                continue
            report.accounts_corrected += 1
            report.minutes_corrected += len(corrections)
            if not dry_run:
                await self.roller.roll(account, minute, corrections)

    async def _accounts(self, hour: int, only: str | None) -> list[str]:
        if only:
            return [only]
        found: set[str] = set()
        query = {"hour": to_datetime(hour)}
        async for doc in store.events(self.db).find(query, {"_id": 0, "account_id": 1}):
            found.add(doc["account_id"])
        async for doc in self.db[keys.HOURS].find({"start": to_datetime(hour)},
                                                  {"_id": 0, "account_id": 1}):  # fmt: skip
            found.add(doc["account_id"])
        return sorted(found)

    async def _snapshot_all(
        self, accounts: list[str]
    ) -> tuple[Callable[[str], bool], dict[str, dict[int, Counts]]]:
        """Which batches are not acknowledged yet, and each account's unapplied tail events."""
        pending: set[str] = set()
        delivered: dict[int, StreamId] = {}
        generated: dict[int, StreamId] = {}
        clocks: dict[int, int] = {}  # each partition's own Redis clock (a cluster has several)
        tails: dict[str, dict[int, Counts]] = defaultdict(dict)
        for part in keys.partitions(self.settings):
            reply = await self._snapshot(
                keys=[part.stream, *(part.tail(a) for a in accounts)], args=[keys.GROUP]
            )
            pending.update(f"{part.index}:{i.decode()}" for i in reply[0])
            delivered[part.index] = parse_id(reply[1])
            generated[part.index] = parse_id(reply[2])
            clocks[part.index] = redis_time_ms(reply[3])
            for account, entries in zip(accounts, reply[4:], strict=True):
                head = await self.roller.head(account)
                for entry in parse_entries(part.index, entries):
                    if entry.entry_id <= head.applied_id(part.index):
                        continue
                    per_minute = tails[account]
                    ev = entry.events
                    for ts, event_type, user in zip(ev.ts, ev.types, ev.users, strict=True):
                        m = ts - ts % MINUTE
                        per_minute.setdefault(m, Counts()).add_event(event_type, user)

        def excluded(batch: str) -> bool:
            if batch in pending:
                return True
            partition, _, entry_id = batch.partition(":")
            if not partition.isdigit() or not entry_id:
                return False  # not from a stream (restored or imported): raw is the truth
            stream_id, index = parse_id(entry_id), int(partition)
            queued = delivered.get(index, (0, 0)) < stream_id <= generated.get(index, (0, 0))
            return queued or stream_id[0] >= clocks.get(index, 2**63)  # made after the snapshot

        return excluded, tails

    async def _recount(
        self,
        hour: int,
        only: str | None,
        excluded: Callable[[str], bool],
        minute: int,
        report: Report,
    ) -> dict[str, dict[int, Counts]]:
        query: dict[str, object] = {"hour": to_datetime(hour)}
        if only:
            query["account_id"] = only
        fields = {"_id": 0, "account_id": 1, "timestamp": 1, "type": 1, "user_id": 1, "batch": 1}
        raw: dict[str, dict[int, Counts]] = defaultdict(dict)
        async for doc in store.events(self.db).find(query, fields, batch_size=10_000):
            if excluded(doc.get("batch", "")):
                continue
            m = floor(ms(doc["timestamp"]), "minute")
            if m >= minute:
                continue  # not in buckets yet: summaries count it from the tail
            report.events += 1
            raw[doc["account_id"]].setdefault(m, Counts()).add_event(doc["type"], doc["user_id"])
        return raw

    async def _differences(
        self,
        account: str,
        hour: int,
        minute: int,
        raw: dict[int, Counts],
        tail: dict[int, Counts],
    ) -> dict[int, Counts]:
        """Per minute: raw - (bucket + unapplied tail events); only where it differs."""
        head = await self.roller.head(account)
        corrections: dict[int, Counts] = {}
        minute_floor = minute - self.settings.minute_retention_hours * HOUR
        if hour >= minute_floor:
            for m in starts(hour, min(hour + HOUR, minute), "minute"):
                held = await self._held("minute", head.bucket_doc_id("minute", m))
                diff = _difference(raw.get(m), held, tail.get(m))
                if diff is not None:
                    corrections[m] = diff
            return corrections
        # past minute retention only the hour bucket holds the figures: correct
        # the hour as a whole, booked on its first minute
        held = await self._held("hour", head.bucket_doc_id("hour", hour))
        whole_raw, whole_tail = Counts(), Counts()
        for counts in raw.values():
            whole_raw.merge(counts)
        for m, counts in tail.items():
            if hour <= m < hour + HOUR:
                whole_tail.merge(counts)
        diff = _difference(whole_raw, held, whole_tail)
        if diff is not None:
            corrections[hour] = diff
        return corrections

    async def _held(self, kind: Resolution, doc_id: str | None) -> Counts | None:
        if doc_id is None:
            return None
        packed = await read_packed(self.db, kind, doc_id)
        if packed is None:
            raise LookupError(f"{kind} bucket {doc_id} is missing")
        return packed.unpack()


def _difference(raw: Counts | None, held: Counts | None, tail: Counts | None) -> Counts | None:
    expected = raw.copy() if raw else Counts()
    have = held.copy() if held else Counts()
    if tail:
        have.merge(tail)
    if (expected.total, expected.types, expected.users) == (have.total, have.types, have.users):
        return None
    expected.merge(have, -1)
    return expected
