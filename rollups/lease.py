"""Rollup partitions and their leases: which process rolls which accounts, fenced.

Accounts map to ``ROLLUP_PARTITIONS`` partitions by a stable hash
(``core/keys.py``). Each partition has a lease in Redis: a key naming its holder
and the fencing token it was taken with, lapsing ``ttl`` after it was last
renewed. Every key of this module shares one hash tag, so each step below is one
Lua script, atomic, on one Redis Cluster slot.

**Sharing** (:meth:`Leases.tick`, every ``ROLLUP_INTERVAL_SECONDS`` in each
rollups process). A process beats in a sorted set of members that lapses like a
lease; with K members alive each takes at most ceil(P/K) of the P partitions.
It renews the leases it holds, gives back those past its share (the last of its
order first, never one it is rolling: that waits for the pass to end), then takes
free ones up to its share, trying them in an order rotated by a hash of its
identity, so processes that start together reach for different ones first. A
second process that starts finds the first holding them all, waits a tick while
the first gives half back, then takes them; a process that dies stops renewing:
its leases and its membership lapse within the TTL (10 s) and the others' shares
grow, so they take its partitions at their next tick. Processes on any number of
hosts share them the same way (``ROLES`` decides which hosts run one).

**Fencing.** Taking a partition increments one counter (shared by all the
partitions, in the same script): its value is the holder's token. Every head
records the token its writer held (``Head.fence``), and a head is published only
after one written under a token no newer: before the insert, the publisher checks
the head it follows, which it read (or wrote) itself; the insert is the
compare-and-set on the next version (unique ``_id``), so the check and the write
concern the same predecessor: if another head came in between, the insert fails
anyway. So along an account's versions the tokens never decrease. Once a new
holder has written an account's head, a process whose lease lapsed (stopped, a
long pause, cut off from Redis) can no longer write one for it, even while it
still believes it holds the partition; before that, its head is simply followed
by the new holder's, which reads it first (a partition taken over forgets the
heads it kept). Two holders never interleave heads of one account. The counter
is one for all the partitions so that tokens stay comparable when
``ROLLUP_PARTITIONS`` changes and an account moves to another partition. What
else a stale process can do is harmless: its documents are discarded when its
head is refused, its head copy never replaces a newer one, it trims only tail
entries a head it published applied, and retiring deletes only what the head it
knows (or an older one) superseded (``rollups/sweep.py``).

**Handing over** (:meth:`Leases.take`). A backfill or an erasure asks for the
partitions it touches (``wanted`` keys, lapsing ``WANT_SECONDS`` after it last
said so, so a dead one stops asking) and takes them all at once when all are free
(all or none: two of them never hold part of what the other waits for). Rollups
processes give up a wanted partition at their next tick (mid-pass: after the
batch they are writing) and take none that is wanted; when the backfill releases
them, they take them back.

**Why not redis-py's ``Lock``** (the single rollups lease used it): a ``Lock`` guards
one key and gives its holder no token. Here one process takes, renews and gives
back any number of partitions in one atomic script, each taking gets a fencing token
the heads record, and a backfill's ``wanted`` keys make holders hand partitions over:
none of which a ``Lock`` does, and building them around one would take the same
scripts.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
import zlib
from collections.abc import Collection, Iterable

from core import keys
from core.connections import Redis
from core.settings import Settings

WANT_SECONDS = 30.0
TAKE_POLL_SECONDS = 0.2

# One rollups process's tick: beat, renew, give back, take.
# KEYS: members, fence counter, then the P lease keys, then the P wanted keys
# ARGV: owner, ttl (ms), P, busy ("0"/"1" per partition), then the partitions in the
#   owner's order (0-based)
# returns: members alive, then per partition held: partition, token
_TICK = """
local owner, ttl, P, busy = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + ttl, owner)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local alive = redis.call('ZCARD', KEYS[1])
local share = math.ceil(P / alive)
local function lease(r) return KEYS[3 + r] end
local function wanted(r)
  local w = redis.call('GET', KEYS[3 + P + r])
  return w and w ~= owner
end
local function busy_(r) return string.sub(busy, r + 1, r + 1) == '1' end
local held = {}
for i = 1, P do
  local r = tonumber(ARGV[4 + i])
  local v = redis.call('GET', lease(r))
  if v then
    local sep = string.find(v, ' ', 1, true)
    if string.sub(v, 1, sep - 1) == owner then
      if wanted(r) and not busy_(r) then
        redis.call('DEL', lease(r))
      else
        redis.call('PEXPIRE', lease(r), ttl)
        held[#held + 1] = {r, string.sub(v, sep + 1)}
      end
    end
  end
end
local i = #held
while #held > share and i >= 1 do
  if not busy_(held[i][1]) then
    redis.call('DEL', lease(held[i][1]))
    table.remove(held, i)
  end
  i = i - 1
end
local mine = {}
for _, h in ipairs(held) do mine[h[1]] = true end
for j = 1, P do
  if #held >= share then break end
  local r = tonumber(ARGV[4 + j])
  if not mine[r] and redis.call('EXISTS', lease(r)) == 0 and not wanted(r) then
    local token = redis.call('INCR', KEYS[2])
    redis.call('SET', lease(r), owner .. ' ' .. token, 'PX', ttl)
    held[#held + 1] = {r, tostring(token)}
  end
end
local out = {alive}
for _, h in ipairs(held) do
  out[#out + 1] = h[1]
  out[#out + 1] = h[2]
end
return out
"""

# A backfill's or an erasure's: say it wants these partitions, and take them all if
# every one is free (or its own already); else take none.
# KEYS: fence counter, then per partition: lease key, wanted key
# ARGV: owner, ttl (ms), want ttl (ms)
# returns the tokens, in KEYS order, or an empty list
_TAKE = """
local owner, ttl, want = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = (#KEYS - 1) / 2
local free = true
for i = 1, n do
  local w = redis.call('GET', KEYS[2 * i + 1])
  if not w or w == owner then redis.call('SET', KEYS[2 * i + 1], owner, 'PX', want) end
  local v = redis.call('GET', KEYS[2 * i])
  if v and string.sub(v, 1, string.find(v, ' ', 1, true) - 1) ~= owner then free = false end
end
if not free then return {} end
local out = {}
for i = 1, n do
  local v = redis.call('GET', KEYS[2 * i])
  if v then
    out[i] = string.sub(v, string.find(v, ' ', 1, true) + 1)
    redis.call('PEXPIRE', KEYS[2 * i], ttl)
  else
    out[i] = tostring(redis.call('INCR', KEYS[1]))
    redis.call('SET', KEYS[2 * i], owner .. ' ' .. out[i], 'PX', ttl)
  end
end
return out
"""

# Renew leases if they are still this owner's; how many were.
# KEYS: lease keys; ARGV: owner, ttl (ms)
_RENEW = """
local n = 0
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v and string.sub(v, 1, string.find(v, ' ', 1, true) - 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2]))
    n = n + 1
  end
end
return n
"""

# Give back leases and withdraw wants, where they are this owner's; leave the members.
# KEYS: members, then lease and wanted keys; ARGV: owner
_RELEASE = """
for i = 2, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v and (v == ARGV[1] or string.sub(v, 1, #ARGV[1] + 1) == ARGV[1] .. ' ') then
    redis.call('DEL', KEYS[i])
  end
end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""


class Leases:
    """The rollup partitions one process holds, with their fencing tokens (``held``)."""

    def __init__(self, client: Redis, settings: Settings, who: str, ttl_seconds: float) -> None:
        self.settings = settings
        self.count = settings.rollup_partitions
        self.owner = f"{who}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl_ms = int(ttl_seconds * 1000)
        self.held: dict[int, int] = {}  # partition -> fencing token (updated in place)
        self.alive = 0  # rollups processes sharing the partitions, at the last tick
        turn = zlib.crc32(self.owner.encode()) % self.count
        self.order = [(turn + i) % self.count for i in range(self.count)]
        self._client = client
        self._tick = client.register_script(_TICK)
        self._take = client.register_script(_TAKE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._asked: list[int] = []

    def _lease_keys(self, partitions: Iterable[int]) -> list[str]:
        return [keys.rollup_lease(self.settings, p) for p in partitions]

    def _pairs(self, partitions: Iterable[int]) -> list[str]:
        """Each partition's lease and wanted keys, in turn."""
        out = []
        for p in partitions:
            out += [keys.rollup_lease(self.settings, p), keys.rollup_wanted(self.settings, p)]
        return out

    async def tick(self, busy: Collection[int] = ()) -> tuple[set[int], set[int]]:
        """The rollups process's beat (module docstring): the partitions it gained and
        those it lost or gave back since the last tick."""
        every = range(self.count)
        flags = "".join("1" if p in busy else "0" for p in every)
        script_keys = [keys.rollup_members(self.settings), keys.rollup_fence(self.settings),
                       *self._lease_keys(every),
                       *(keys.rollup_wanted(self.settings, p) for p in every)]  # fmt: skip
        args: list[str | int] = [self.owner, self.ttl_ms, self.count, flags, *self.order]
        reply = await self._tick(keys=script_keys, args=args)
        self.alive = int(reply[0])
        now = {int(p): int(t) for p, t in zip(reply[1::2], reply[2::2], strict=True)}
        gained = {p for p, t in now.items() if self.held.get(p) != t}
        lost = {p for p, t in self.held.items() if now.get(p) != t}
        self.held.clear()
        self.held.update(now)
        return gained, lost

    async def wanted(self, partitions: Iterable[int]) -> set[int]:
        """Which of these partitions a backfill or an erasure asks for."""
        parts = list(partitions)
        if not parts:
            return set()
        async with self._client.pipeline(transaction=False) as pipe:
            for p in parts:
                pipe.get(keys.rollup_wanted(self.settings, p))
            replies = await pipe.execute()
        mine = self.owner.encode()
        return {p for p, w in zip(parts, replies, strict=True) if w is not None and w != mine}

    async def take(self, partitions: Iterable[int], timeout: float) -> bool:
        """Ask for these partitions and take them all (within ``timeout`` seconds): their
        holders give them up at their next tick, and take none back while they are ours."""
        self._asked = sorted(set(partitions))
        script_keys = [keys.rollup_fence(self.settings), *self._pairs(self._asked)]
        args: list[str | int] = [self.owner, self.ttl_ms, int(WANT_SECONDS * 1000)]
        deadline = time.monotonic() + timeout
        while True:
            tokens = await self._take(keys=script_keys, args=args)
            if tokens:
                self.held.clear()
                self.held.update(zip(self._asked, (int(t) for t in tokens), strict=True))
                return True
            if time.monotonic() >= deadline:
                await self.release()
                return False
            await asyncio.sleep(TAKE_POLL_SECONDS)

    async def hold(self) -> bool:
        """Renew what :meth:`take` took; False if any of it lapsed (and may be another's)."""
        if not self.held:
            return False
        parts = sorted(self.held)
        renewed = await self._renew(keys=self._lease_keys(parts), args=[self.owner, self.ttl_ms])
        return int(renewed) == len(parts)

    async def release(self) -> None:
        """Give back every lease held here and withdraw every want; leave the members."""
        parts = sorted(set(self.held) | set(self._asked))
        script_keys = [keys.rollup_members(self.settings), *self._pairs(parts)]
        await self._release(keys=script_keys, args=[self.owner])
        self.held.clear()
        self._asked = []


def holder(lease_value: bytes | None) -> str | None:
    """Who holds a partition, from its lease key's value (for tests and tools)."""
    return None if lease_value is None else lease_value.decode().rpartition(" ")[0]
