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
from typing import Any, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from core import tail
from core.connections import REDIS_ERRORS, Redis
from core.keys import GROUP, Partition, account_dirty_set, partition_of, partitions
from core.settings import Settings
from core.tail import TailEvents

# Every enqueue a worker's requests asked for in one event-loop tick, for one
# partition, in one call: each entry checked and added in turn exactly as if it
# came alone (its limits in order, then the queue bound), so the outcome of each
# is what a call of its own would have given. The limits (service/quotas.py) are
# of two kinds: a count per period (rate limits) and a set per period (distinct
# types, distinct accounts); an entry that passes adds to each.
#
# KEYS: stream, depth counter, then the keys the limits name
# ARGV: queue bound, entry count n, then per entry: event count, body, number of
#   limits c, then per limit: kind (1 count, 2 set), key index (into KEYS), limit,
#   ttl, refusal code, then for a count: how much it adds; for a set: m, m members
# returns per entry two numbers: 1 (queued), -1 (queue full) or the refusal code of
#   the first limit it would pass; and that limit's number in the entry (0: none)
_ENQUEUE = """
local bound, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local depth = tonumber(redis.call('GET', KEYS[2]) or '0')
local counts, members, sizes, out = {}, {}, {}, {}
local pos, queued = 3, 0
for e = 1, n do
  local events, body, c = tonumber(ARGV[pos]), ARGV[pos + 1], tonumber(ARGV[pos + 2])
  pos = pos + 3
  local limits, refused, which = {}, 0, 0
  for i = 1, c do
    local kind, k, limit = tonumber(ARGV[pos]), tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 2])
    local ttl, code = tonumber(ARGV[pos + 3]), tonumber(ARGV[pos + 4])
    pos = pos + 5
    if kind == 1 then
      local add = tonumber(ARGV[pos])
      pos = pos + 1
      counts[k] = counts[k] or tonumber(redis.call('GET', KEYS[k]) or '0')
      if refused == 0 and counts[k] + add > limit then refused, which = code, i end
      limits[i] = {kind, k, ttl, add}
    else
      local m = tonumber(ARGV[pos])
      pos = pos + 1
      if members[k] == nil then
        members[k] = {}
        sizes[k] = redis.call('SCARD', KEYS[k])
      end
      local new = {}
      for j = pos, pos + m - 1 do
        if not members[k][ARGV[j]] and redis.call('SISMEMBER', KEYS[k], ARGV[j]) == 0 then
          new[#new + 1] = ARGV[j]
        end
      end
      pos = pos + m
      if refused == 0 and #new > 0 and sizes[k] + #new > limit then refused, which = code, i end
      limits[i] = {kind, k, ttl, new}
    end
  end
  if refused == 0 and depth > 0 and depth + events > bound then refused = -1 end
  if refused == 0 then
    redis.call('XADD', KEYS[1], '*', 'count', events, 'body', body)
    depth = depth + events
    queued = queued + events
    for i = 1, c do
      local kind, k, ttl, what = limits[i][1], limits[i][2], limits[i][3], limits[i][4]
      if kind == 1 then
        counts[k] = counts[k] + what
        redis.call('INCRBY', KEYS[k], what)
      else
        for _, member in ipairs(what) do
          members[k][member] = true
          sizes[k] = sizes[k] + 1
          redis.call('SADD', KEYS[k], member)
        end
      end
      redis.call('EXPIRE', KEYS[k], ttl)
    end
    out[#out + 1] = 1
    out[#out + 1] = 0
  else
    out[#out + 1] = refused
    out[#out + 1] = which
  end
end
if queued > 0 then redis.call('INCRBY', KEYS[2], queued) end
return out
"""

QUEUED, QUEUE_FULL = 1, -1

# Retire entries this consumer still owns: acknowledge, delete, shrink the
# depth counter, append the events each one newly stored to the accounts'
# tails (and mark those accounts dirty for the rollup job, in the dirty set of
# the account's rollup partition), optionally park the entry in the dead-letter
# stream. An entry another consumer has claimed meanwhile is left alone: its new
# owner stores and counts it, so counting it here too would count it twice.
#
# KEYS: stream, depth, dead-letter stream, then the tail keys and dirty sets
# ARGV: group, consumer, number of entries, then per entry:
#   id, event count, dead-letter reason ("" = none), body, attempts, first and last
#   failure (epoch ms), events it stored, accounts (comma-separated) (the last six ""
#   unless dead-lettered), number of tails k, then k times: tail key index and dirty
#   set index (into KEYS), account, events blob
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
      redis.call('XADD', KEYS[3], '*', 'count', count, 'body', body, 'reason', reason,
                 'source_id', id, 'attempts', ARGV[dead], 'first_failure', ARGV[dead + 1],
                 'last_failure', ARGV[dead + 2], 'stored', ARGV[dead + 3],
                 'accounts', ARGV[dead + 4])
    end
    for t = 1, tails do
      redis.call('XADD', KEYS[tonumber(ARGV[pos])], '*', 'e', ARGV[pos + 3])
      redis.call('SADD', KEYS[tonumber(ARGV[pos + 1])], ARGV[pos + 2])
      pos = pos + 4
    end
    out[e] = 1
  else
    pos = pos + 4 * tails
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
# KEYS: stream, depth, then d dirty sets, then the tail keys
# ARGV: group, consumer, number of entries n, n ids, total event count, d,
#   then per tail key (in KEYS order): account, events blob, its dirty set's index
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
local pos = 6 + n
for t = 3 + tonumber(ARGV[5 + n]), #KEYS do
  redis.call('XADD', KEYS[t], '*', 'e', ARGV[pos + 1])
  redis.call('SADD', KEYS[tonumber(ARGV[pos + 2])], ARGV[pos])
  pos = pos + 3
end
return 1
"""


class Limit(Protocol):
    """What an entry must stay within (service/quotas.py ``Check``)."""

    @property
    def key(self) -> str: ...

    def args(self, key_index: int) -> list[int | str]: ...


@dataclass
class _Call:
    """The enqueues of one partition in one tick: one script call."""

    part: Partition
    limit_keys: dict[str, int] = field(default_factory=dict)  # key -> its index in KEYS
    entries: list[Any] = field(default_factory=list)  # count, body, limits, ...
    replies: list[asyncio.Future[tuple[int, int]]] = field(default_factory=list)

    def add(self, body: bytes, count: int, limits: Sequence[Limit]) -> None:
        self.entries += (count, body, len(limits))
        for limit in limits:
            index = self.limit_keys.setdefault(limit.key, len(self.limit_keys) + 3)
            self.entries += limit.args(index)

    def args(self, sha: bytes, bound: bytes) -> list[Any]:
        keys = [self.part.stream, self.part.depth, *self.limit_keys]
        return [sha, len(keys), *keys, bound, len(self.replies), *self.entries]


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
        self._bound = str(settings.queue_max_events).encode()  # encoded once, not per call
        self._waiting: dict[int, _Call] = {}
        self._parts = partitions(settings)
        self._in_flight: set[asyncio.Task[None]] = set()

    def partition(self, account_id: str) -> Partition:
        """Where a batch whose first event is of this account goes."""
        if len(self._parts) == 1:
            return self._parts[0]
        return partition_of(self._settings, account_id)

    async def enqueue(
        self, part: Partition, body: bytes, count: int, limits: Sequence[Limit] = ()
    ) -> tuple[int, int]:
        """(QUEUED or QUEUE_FULL or the refusal code of a limit, that limit's number)."""
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._send_waiting)
        call = self._waiting.get(part.index)
        if call is None:
            call = self._waiting[part.index] = _Call(part)
        call.add(body, count, limits)
        reply: asyncio.Future[tuple[int, int]] = loop.create_future()
        call.replies.append(reply)
        return await reply

    def _send_waiting(self) -> None:
        calls, self._waiting = list(self._waiting.values()), {}
        for call in calls:
            task = asyncio.ensure_future(self._send(call))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _send(self, call: _Call) -> None:
        args = call.args(self._sha, self._bound)
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
        outcomes = zip(results[0::2], results[1::2], strict=True)
        for reply, (outcome, which) in zip(call.replies, outcomes, strict=True):
            if not reply.done():  # the request may have gone away meanwhile
                reply.set_result((int(outcome), int(which)))


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
        dirty: dict[str, int] = {}  # dirty set -> its index in KEYS
        sets = [dirty.setdefault(account_dirty_set(self._settings, part, a), len(dirty) + 3)
                for a in merged]  # fmt: skip
        args.append(len(dirty))
        for (account, events), index in zip(merged.items(), sets, strict=True):
            args += [account, tail.encode(events), index]
        keys = [part.stream, part.depth, *dirty, *(part.tail(a) for a in merged)]
        return bool(await self._retire_all(keys=keys, args=args))

    async def _retire_each(self, retirements: Sequence[Retirement]) -> list[bool]:
        part = self.partition
        indexes: dict[str, int] = {}  # tail keys and dirty sets -> their index in KEYS
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
                dirty = account_dirty_set(self._settings, part, account)
                for key in (part.tail(account), dirty):
                    args.append(indexes.setdefault(key, len(indexes) + 4))
                args += [account, tail.encode(events)]
        keys = [part.stream, part.depth, part.dead, *indexes]
        result = await self._retire(keys=keys, args=args)
        return [bool(flag) for flag in result]

    def _entries(self, reply: Any, redelivered: bool) -> list[Entry]:
        out: list[Entry] = []
        for _stream, items in reply or []:
            out.extend(self._entry(i, f, redelivered) for i, f in items if f)
        return out

    def _entry(self, entry_id: bytes, fields: dict[bytes, bytes], redelivered: bool) -> Entry:
        return Entry(self.partition, entry_id, int(fields[b"count"]), fields[b"body"], redelivered)
