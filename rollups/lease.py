"""A Redis lease: one rollup job (or backfill) at a time across every host.

Correctness does not depend on it (every rollover publishes by
compare-and-set of the account's head); it keeps two hosts from doing the
same work twice.
"""

from __future__ import annotations

import socket
import uuid

from core.connections import Redis

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
    def __init__(self, client: Redis, key: str, ttl_seconds: float, who: str) -> None:
        self.key = key
        self.token = f"{who}:{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self._ttl_ms = int(ttl_seconds * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)

    async def hold(self) -> bool:
        """Take the lease or extend it; whether it is ours now."""
        return bool(await self._acquire(keys=[self.key], args=[self.token, self._ttl_ms]))

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.token])
