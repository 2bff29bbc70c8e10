"""The Redis streams between the HTTP workers and the flushers.

One stream entry per accepted batch (fields ``count`` and ``body``, the
validated request body): a batch is all-or-nothing anyway, so one entry keeps
that atomic for free, costs one XADD per request, and lets the flusher decode
a whole batch in one msgspec call (``scripts/bench_queue.py``).

A counter beside each stream holds the events accepted but not yet stored. The
enqueue script checks it against the bound and adds the entry in one atomic
step; the acknowledge script decrements it only for an entry it really
acknowledged, so the counter always equals the events still pending, however
often an entry is redelivered or reclaimed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from core import tail
from core.connections import REDIS_ERRORS, Redis
from core.keys import GROUP, Partition, partition_of, partitions
from core.settings import Settings
from core.tail import TailEvents

# Every enqueue a worker's requests asked for in one event-loop tick, for one
# partition, in one call: each entry checked and added in turn exactly as if it
# came alone (the rate limit of its client, then the queue bound), so the outcome
# of each is what a call of its own would have given.
#
# KEYS: stream, depth counter, then the rate-limit keys the entries name
# ARGV: queue bound, rate limit per second (0: off), entry count n, then per entry:
#   event count, body, index of its rate-limit key in KEYS (0: none)
# returns per entry 1 when queued, -1 when the queue is full, -2 when rate limited
_ENQUEUE = """
local bound, limit, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local depth = tonumber(redis.call('GET', KEYS[2]) or '0')
local used, added, out = {}, {}, {}
local queued = 0
for i = 0, n - 1 do
  local count, body, rate = tonumber(ARGV[4 + 3 * i]), ARGV[5 + 3 * i], tonumber(ARGV[6 + 3 * i])
  local result = 1
  if limit > 0 and rate > 0 then
    used[rate] = used[rate] or tonumber(redis.call('GET', KEYS[rate]) or '0')
    if used[rate] + count > limit then result = -2 end
  end
  if result == 1 and depth > 0 and depth + count > bound then result = -1 end
  if result == 1 then
    redis.call('XADD', KEYS[1], '*', 'count', count, 'body', body)
    depth = depth + count
    queued = queued + count
    if limit > 0 and rate > 0 then
      used[rate] = used[rate] + count
      added[rate] = (added[rate] or 0) + count
    end
  end
  out[i + 1] = result
end
if queued > 0 then redis.call('INCRBY', KEYS[2], queued) end
for rate, count in pairs(added) do
  redis.call('INCRBY', KEYS[rate], count)
  redis.call('EXPIRE', KEYS[rate], 2)
end
return out
"""

QUEUED, QUEUE_FULL, RATE_LIMITED = 1, -1, -2

# Retire entries this consumer still owns: acknowledge, delete, shrink the
# depth counter, append the events each one newly stored to the accounts'
# tails (and mark those accounts dirty for the rollup job), optionally park the
# entry in the dead-letter stream. An entry another consumer has claimed
# meanwhile is left alone: its new owner stores and counts it, so counting it
# here too would count it twice.
#
# KEYS: stream, depth, dirty set, dead-letter stream, then the tail keys
# ARGV: group, consumer, number of entries, then per entry:
#   id, event count, dead-letter reason ("" = none), body, attempts, first and last
#   failure (epoch ms), events it stored, accounts (comma-separated) (the last six ""
#   unless dead-lettered), number of tails k, then k times: tail key index (into
#   KEYS), account, events blob
# returns per entry 1 (retired here) or 0 (no longer ours)
_RETIRE = """
local group, consumer = ARGV[1], ARGV[2]
local pos = 4
local out = {}
for e = 1, tonumber(ARGV[3]) do
  local id, count, reason, body = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2], ARGV[pos + 3]
  local tails = tonumber(ARGV[pos + 9])
  local dead = pos + 4
  pos = pos + 10
  local owned = redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer)
  if #owned == 1 and redis.call('XACK', KEYS[1], group, id) == 1 then
    redis.call('XDEL', KEYS[1], id)
    redis.call('DECRBY', KEYS[2], count)
    if reason ~= '' then
      redis.call('XADD', KEYS[4], '*', 'count', count, 'body', body, 'reason', reason,
                 'source_id', id, 'attempts', ARGV[dead], 'first_failure', ARGV[dead + 1],
                 'last_failure', ARGV[dead + 2], 'stored', ARGV[dead + 3],
                 'accounts', ARGV[dead + 4])
    end
    for t = 1, tails do
      redis.call('XADD', KEYS[tonumber(ARGV[pos])], '*', 'e', ARGV[pos + 2])
      redis.call('SADD', KEYS[3], ARGV[pos + 1])
      pos = pos + 3
    end
    out[e] = 1
  else
    pos = pos + 3 * tails
    out[e] = 0
  end
end
return out
"""

# The usual case of the above, cheaper: every entry is still this consumer's and
# none is dead-lettered, so their events go to each account's tail as one entry
# (one tail entry per account per flush, not per batch: under load that is ~20x
# fewer entries for every summary and rollover to read). Does nothing and
# returns 0 if any entry is no longer ours: the caller retires them one by one.
#
# KEYS: stream, depth, dirty set, then the tail keys
# ARGV: group, consumer, number of entries n, n ids, total event count,
#   then per tail key (in KEYS order): account, events blob
_RETIRE_ALL = """
local group, consumer, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
for i = 4, 3 + n do
  if #redis.call('XPENDING', KEYS[1], group, ARGV[i], ARGV[i], 1, consumer) ~= 1 then
    return 0
  end
end
for i = 4, 3 + n, 1000 do  -- unpack() refuses more than ~8000 values at once
  local last = math.min(i + 999, 3 + n)
  redis.call('XACK', KEYS[1], group, unpack(ARGV, i, last))
  redis.call('XDEL', KEYS[1], unpack(ARGV, i, last))
end
redis.call('DECRBY', KEYS[2], ARGV[4 + n])
local pos = 5 + n
for t = 4, #KEYS do
  redis.call('XADD', KEYS[t], '*', 'e', ARGV[pos + 1])
  redis.call('SADD', KEYS[3], ARGV[pos])
  pos = pos + 2
end
return 1
"""


@dataclass
class _Call:
    """The enqueues of one partition in one tick: one script call."""

    part: Partition
    rate_keys: dict[str, int] = field(default_factory=dict)  # key -> its index in KEYS
    entries: list[Any] = field(default_factory=list)  # count, body, rate index, ...
    replies: list[asyncio.Future[int]] = field(default_factory=list)

    def args(self, sha: bytes, tail: list[bytes]) -> list[Any]:
        keys = [self.part.stream, self.part.depth, *self.rate_keys]
        return [sha, len(keys), *keys, *tail, len(self.replies), *self.entries]


class Producer:
    """What an HTTP worker needs: enqueue a validated batch, or refuse it.

    The enqueues that concurrent requests ask for in the same event-loop tick go
    to Redis as one script call per partition (one command to encode, send,
    run and parse, one fsync of the AOF for all of them): per-command client
    and server overhead was the largest cost of a small ingest request
    (py-spy; docs/PROFILE.md). Each caller still gets its own reply, so a 202
    still means Redis has acknowledged that batch.
    """

    def __init__(self, client: Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings
        self._sha = hashlib.sha1(_ENQUEUE.encode()).hexdigest().encode()
        # the arguments every call shares, encoded once (redis-py encodes per call)
        self._tail = [str(settings.queue_max_events).encode(),
                      str(settings.rate_limit_events_per_second).encode()]  # fmt: skip
        self._waiting: dict[int, _Call] = {}
        self._parts = partitions(settings)
        self._in_flight: set[asyncio.Task[None]] = set()

    async def enqueue(self, body: bytes, count: int, account_id: str, client_id: str) -> int:
        part = self._parts[0] if len(self._parts) == 1 else partition_of(self._settings, account_id)
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._send_waiting)
        call = self._waiting.get(part.index)
        if call is None:
            call = self._waiting[part.index] = _Call(part)
        rate = 0
        if self._settings.rate_limit_events_per_second:
            key = part.rate(client_id, int(time.time()))
            rate = call.rate_keys.setdefault(key, len(call.rate_keys) + 3)
        call.entries += (count, body, rate)
        reply: asyncio.Future[int] = loop.create_future()
        call.replies.append(reply)
        return await reply

    def _send_waiting(self) -> None:
        calls, self._waiting = list(self._waiting.values()), {}
        for call in calls:
            task = asyncio.ensure_future(self._send(call))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _send(self, call: _Call) -> None:
        args = call.args(self._sha, self._tail)
        try:
            try:
                results = await self._client.execute_command("EVALSHA", *args)
            except NoScriptError:
                # a restarted Redis forgot the script: the call did not run
                await self._client.script_load(_ENQUEUE)
                results = await self._client.execute_command("EVALSHA", *args)
        except Exception as exc:  # every caller of this call hears it
            if not isinstance(exc, REDIS_ERRORS):
                # redis-py's cluster client can fail this way while a node dies; to the
                # caller it is the same: the enqueue may or may not have happened
                exc = RedisConnectionError(f"the Redis client failed: {exc!r}")
            for reply in call.replies:
                if not reply.done():
                    reply.set_exception(exc)
            return
        for reply, result in zip(call.replies, results, strict=True):
            if not reply.done():  # the request may have gone away meanwhile
                reply.set_result(int(result))


@dataclass(frozen=True)
class Entry:
    """One accepted batch in a stream partition."""

    partition: Partition
    entry_id: bytes
    count: int
    body: bytes
    # read before (by this or another consumer): some of its events may
    # already be stored, so what it stored is read back rather than inferred
    redelivered: bool

    @property
    def batch_id(self) -> str:
        """Unique across partitions; stored with each of its events."""
        return f"{self.partition.index}:{self.entry_id.decode()}"


@dataclass
class Failure:
    """Why and how often an entry failed, kept with it when it is dead-lettered."""

    attempts: int
    first_ms: int  # epoch ms of its first and last failed attempt
    last_ms: int
    accounts: str = ""  # its events' accounts, comma-separated ("": unknown)


@dataclass
class Retirement:
    """What to do with one entry: its stored events per account, or dead-letter it."""

    entry: Entry
    tails: dict[str, TailEvents] = field(default_factory=dict)  # account -> events stored
    dead_reason: str = ""
    failure: Failure | None = None  # with dead_reason


class Consumer:
    """What a flusher needs from one partition: read, reclaim, retire."""

    def __init__(self, client: Redis, part: Partition, name: str, settings: Settings):
        self._client = client
        self.partition = part
        self.name = name
        self._settings = settings
        self._retire = client.register_script(_RETIRE)
        self._retire_all = client.register_script(_RETIRE_ALL)

    async def ensure_group(self) -> None:
        try:
            await self._client.xgroup_create(self.partition.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_own_pending(self, count: int) -> list[Entry]:
        """Entries this consumer read before it died and never acknowledged."""
        reply = await self._client.xreadgroup(
            GROUP, self.name, {self.partition.stream: "0"}, count=count
        )
        return self._entries(reply, redelivered=True)

    async def claim_abandoned(self, count: int) -> list[Entry]:
        """Entries another (dead) consumer left pending for too long."""
        reply = await self._client.xautoclaim(
            self.partition.stream,
            GROUP,
            self.name,
            min_idle_time=self._settings.claim_idle_ms,
            start_id="0-0",
            count=count,
        )
        return [self._entry(i, f, True) for i, f in reply[1] if f]

    async def read_new(self, count: int, block_ms: int | None) -> list[Entry]:
        reply = await self._client.xreadgroup(
            GROUP, self.name, {self.partition.stream: ">"}, count=count, block=block_ms
        )
        return self._entries(reply, redelivered=False)

    async def retire(self, retirements: Sequence[Retirement]) -> list[bool]:
        """Retire the entries still ours, atomically; which ones were."""
        if not retirements:
            return []
        together = not any(r.dead_reason for r in retirements)
        if together and await self._retire_together(retirements):
            return [True] * len(retirements)
        return await self._retire_each(retirements)

    async def _retire_together(self, retirements: Sequence[Retirement]) -> bool:
        merged: dict[str, TailEvents] = {}
        for r in retirements:
            for account, events in r.tails.items():
                into = merged.get(account)
                if into is None:
                    merged[account] = TailEvents(list(events.ts), list(events.types),
                                                 list(events.users))  # fmt: skip
                else:
                    into.ts.extend(events.ts)
                    into.types.extend(events.types)
                    into.users.extend(events.users)
        part = self.partition
        args: list[Any] = [GROUP, self.name, len(retirements)]
        args += [r.entry.entry_id for r in retirements]
        args.append(sum(r.entry.count for r in retirements))
        for account, events in merged.items():
            args += [account, tail.encode(events)]
        keys = [part.stream, part.depth, part.dirty, *(part.tail(a) for a in merged)]
        return bool(await self._retire_all(keys=keys, args=args))

    async def _retire_each(self, retirements: Sequence[Retirement]) -> list[bool]:
        part = self.partition
        tail_keys: dict[str, int] = {}
        args: list[Any] = [GROUP, self.name, len(retirements)]
        now = int(time.time() * 1000)
        for r in retirements:
            args += [r.entry.entry_id, r.entry.count, r.dead_reason]
            if r.dead_reason:
                failure = r.failure or Failure(1, now, now)
                stored = sum(len(events.ts) for events in r.tails.values())
                args += [r.entry.body, failure.attempts, failure.first_ms, failure.last_ms,
                         stored, failure.accounts]  # fmt: skip
            else:
                args += ["", "", "", "", "", ""]
            args.append(len(r.tails))
            for account, events in r.tails.items():
                key = part.tail(account)
                index = tail_keys.setdefault(key, len(tail_keys) + 5)
                args += [index, account, tail.encode(events)]
        keys = [part.stream, part.depth, part.dirty, part.dead, *tail_keys]
        result = await self._retire(keys=keys, args=args)
        return [bool(flag) for flag in result]

    def _entries(self, reply: Any, redelivered: bool) -> list[Entry]:
        out: list[Entry] = []
        for _stream, items in reply or []:
            out.extend(self._entry(i, f, redelivered) for i, f in items if f)
        return out

    def _entry(self, entry_id: bytes, fields: dict[bytes, bytes], redelivered: bool) -> Entry:
        return Entry(self.partition, entry_id, int(fields[b"count"]), fields[b"body"], redelivered)
