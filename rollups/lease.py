"""A Redis lease: one rollup job (or backfill) at a time across every host.

Correctness does not depend on it (every rollover publishes by
compare-and-set of the account's head); it keeps two hosts from doing the
same work twice.

It is redis-py's ``Lock`` (``SET NX PX`` to take it, its Lua scripts to extend
and release it only while the token is ours), used without blocking: a holder
extends it before each piece of work and stops when that fails, and a
contender simply tries again at its next tick. The token names the holder
(``rollups:<host>:<random>``), so ``GET`` on the key says who has it.
"""

from __future__ import annotations

import contextlib
import socket
import uuid

from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from core.connections import Redis


class Lease:
    def __init__(self, client: Redis, key: str, ttl_seconds: float, who: str) -> None:
        self.key = key
        self.token = f"{who}:{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        # one event loop per process: no thread-local token needed
        self._lock = Lock(client, key, timeout=ttl_seconds, blocking=False, thread_local=False)

    async def hold(self) -> bool:
        """Take the lease or extend it; whether it is ours now."""
        if self._lock.local.token is not None:
            try:
                return await self._lock.reacquire()  # ours: back to the full ttl
            except LockError:  # it lapsed (and someone else may have taken it)
                pass
        return bool(await self._lock.acquire(token=self.token))

    async def release(self) -> None:
        """Let go if it is ours (it may have lapsed already)."""
        with contextlib.suppress(LockError):
            await self._lock.release()
