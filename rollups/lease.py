"""A Redis lease: one rollup job (or backfill, or erasure) at a time across every host.

Correctness does not depend on it (every rollover publishes by
compare-and-set of the account's head); it keeps two hosts from doing the
same work twice.

It is redis-py's ``Lock`` (``SET NX PX`` to take it, its Lua scripts to extend
and release it only while the token is ours), used without blocking: a holder
extends it before each piece of work and stops when that fails, and a
contender simply tries again at its next tick. The token names the holder
(``rollups:<host>:<random>``), so ``GET`` on the key says who has it.

**Handing it over.** The rollups process extends its lease every tick and would
never let go of it. A backfill or an erasure (:meth:`Lease.take`) first says it
wants the lease (``<key>:wanted``, its token, lapsing ``WANT_SECONDS`` after it
last said so, so a dead contender stops asking by itself), then tries to take it;
the rollups process sees the want at its next tick (:meth:`Lease.wanted_elsewhere`),
lets go and stays off until the want lapses or is withdrawn (:meth:`Lease.release`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid

from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from core.connections import Redis

WANT_SECONDS = 30.0
TAKE_POLL_SECONDS = 0.2

# Withdraw a want only if it is ours. KEYS: want; ARGV: token
_UNWANT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    def __init__(self, client: Redis, key: str, ttl_seconds: float, who: str) -> None:
        self.key = key
        self.wanted_key = f"{key}:wanted"
        self.token = f"{who}:{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self._client = client
        self._wanting = False
        # one event loop per process: no thread-local token needed
        self._lock = Lock(client, key, timeout=ttl_seconds, blocking=False, thread_local=False)

    async def hold(self) -> bool:
        """Take the lease or extend it; whether it is ours now."""
        if self._wanting:  # still wanted: nobody else takes it while it lapses
            await self._client.set(self.wanted_key, self.token, px=int(WANT_SECONDS * 1000))
        if self._lock.local.token is not None:
            try:
                return await self._lock.reacquire()  # ours: back to the full ttl
            except LockError:  # it lapsed (and someone else may have taken it)
                pass
        return bool(await self._lock.acquire(token=self.token))

    async def take(self, timeout: float) -> bool:
        """Ask whoever holds the lease to hand it over, and take it (within ``timeout``
        seconds); while it is ours, holders that yield (the rollups process) stay off."""
        self._wanting = True
        deadline = time.monotonic() + timeout
        while not await self.hold():
            if time.monotonic() >= deadline:
                await self.release()
                return False
            await asyncio.sleep(TAKE_POLL_SECONDS)
        return True

    async def wanted_elsewhere(self) -> bool:
        """Whether a backfill or an erasure asked for the lease (the rollups process then
        lets go of it)."""
        wanted = await self._client.get(self.wanted_key)
        return wanted is not None and wanted != self.token.encode()

    async def release(self) -> None:
        """Let go if it is ours (it may have lapsed already), and stop wanting it."""
        with contextlib.suppress(LockError):
            await self._lock.release()
        if self._wanting:
            self._wanting = False
            await self._client.eval(_UNWANT, 1, self.wanted_key, self.token)
