"""The Redis stream between the HTTP workers and the flusher.

One stream entry per accepted batch (fields ``n`` = event count, ``b`` = the
validated request body). A batch is all-or-nothing anyway, so one entry keeps
that atomic for free, costs one XADD per request instead of one per event, and
lets the flusher decode a whole batch in one msgspec call; see
``scripts/bench_queue.py`` for the measured difference.

A counter next to the stream holds the number of events not yet stored; the
enqueue script checks it against the bound and adds the entry in one atomic
step, and the flusher decrements it in the same transaction as its XACK.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from service.config import Settings

GROUP = "flusher"

# KEYS: stream, depth counter, rate-limit key ("" when off)
# ARGV: events in this batch, body, queue bound, rate limit per second
# returns 1 when queued, -1 when the queue is full, -2 when rate limited
_ENQUEUE = """
local n = tonumber(ARGV[1])
if tonumber(ARGV[4]) > 0 then
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if used + n > tonumber(ARGV[4]) then return -2 end
end
local depth = tonumber(redis.call('GET', KEYS[2]) or '0')
if depth > 0 and depth + n > tonumber(ARGV[3]) then return -1 end
redis.call('XADD', KEYS[1], '*', 'n', ARGV[1], 'b', ARGV[2])
redis.call('INCRBY', KEYS[2], n)
if tonumber(ARGV[4]) > 0 then
  redis.call('INCRBY', KEYS[3], n)
  redis.call('EXPIRE', KEYS[3], 2)
end
return 1
"""

QUEUED, QUEUE_FULL, RATE_LIMITED = 1, -1, -2


def connect(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10
    )


class Producer:
    """What an HTTP worker needs: enqueue a validated batch, or refuse it.

    Enqueues issued by concurrent requests in the same event-loop tick go to
    Redis as one pipeline (one write, one read, one fsync of the AOF for all
    of them): per-command client overhead was the largest cost of a small
    ingest request (py-spy; docs/PROFILE.md). Each caller still gets its
    own reply, so a 202 still means Redis has acknowledged that batch.
    """

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings
        self._sha = hashlib.sha1(_ENQUEUE.encode()).hexdigest()
        # the arguments every call shares, encoded once (redis-py encodes per call)
        self._head = [self._sha.encode(), b"3", settings.stream_key.encode(),
                      settings.queue_depth_key.encode()]  # fmt: skip
        self._tail = [str(settings.queue_max_events).encode(),
                      str(settings.rate_limit_events_per_second).encode()]  # fmt: skip
        self._waiting: list[tuple[list[Any], asyncio.Future[int]]] = []
        self._in_flight: set[asyncio.Task[None]] = set()

    async def enqueue(self, body: bytes, count: int, client_id: str) -> int:
        s = self._settings
        limit = s.rate_limit_events_per_second
        rate_key = f"{s.stream_key}:rate:{client_id}:{int(time.time())}" if limit else ""
        args = [*self._head, rate_key, count, body, *self._tail]
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[int] = loop.create_future()
        self._waiting.append((args, reply))
        if len(self._waiting) == 1:
            loop.call_soon(self._send_waiting)
        return await reply

    def _send_waiting(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.ensure_future(self._send(batch))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _send(self, batch: list[tuple[list[Any], asyncio.Future[int]]]) -> None:
        try:
            results = await self._run_pipeline([args for args, _ in batch])
            forgotten = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if forgotten:
                # a restarted Redis forgot the script; those calls did not run
                await self._client.script_load(_ENQUEUE)
                again = await self._run_pipeline([batch[i][0] for i in forgotten])
                for i, result in zip(forgotten, again, strict=True):
                    results[i] = result
        except Exception as exc:  # the connection failed: every caller hears it
            for _, reply in batch:
                if not reply.done():
                    reply.set_exception(exc)
            return
        for (_, reply), result in zip(batch, results, strict=True):
            if reply.done():  # the request went away meanwhile
                continue
            if isinstance(result, Exception):
                reply.set_exception(result)
            else:
                reply.set_result(int(result))

    async def _run_pipeline(self, calls: list[list[Any]]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for args in calls:
                pipe.execute_command("EVALSHA", *args)
            return list(await pipe.execute(raise_on_error=False))


@dataclass(frozen=True)
class Entry:
    entry_id: bytes
    count: int
    body: bytes


class Consumer:
    """What the flusher needs: read, reclaim, acknowledge, dead-letter."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings
        self._stream = settings.stream_key
        self._name = settings.flusher_consumer

    async def ensure_group(self) -> None:
        try:
            await self._client.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_own_pending(self, count: int) -> list[Entry]:
        """Entries this consumer read before it died and never acknowledged."""
        reply = await self._client.xreadgroup(GROUP, self._name, {self._stream: "0"}, count=count)
        return _entries(reply)

    async def claim_abandoned(self, count: int) -> list[Entry]:
        """Entries another (dead) consumer left pending for too long."""
        reply = await self._client.xautoclaim(
            self._stream,
            GROUP,
            self._name,
            min_idle_time=self._settings.claim_idle_ms,
            start_id="0-0",
            count=count,
        )
        return [_entry(entry_id, fields) for entry_id, fields in reply[1] if fields]

    async def read_new(self, count: int, block_ms: int) -> list[Entry]:
        reply = await self._client.xreadgroup(
            GROUP, self._name, {self._stream: ">"}, count=count, block=block_ms
        )
        return _entries(reply)

    async def acknowledge(self, entries: list[Entry]) -> None:
        """Ack, drop the entries and shrink the depth counter, atomically."""
        if not entries:
            return
        async with self._client.pipeline(transaction=True) as pipe:
            self._retire(pipe, entries)
            await pipe.execute()

    async def dead_letter(self, entry: Entry, reason: str) -> None:
        """Park an entry that can never be stored, with why; never drop it."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self._settings.dead_letter_key,
                {"n": entry.count, "b": entry.body, "reason": reason, "source_id": entry.entry_id},
            )
            self._retire(pipe, [entry])
            await pipe.execute()

    def _retire(self, pipe: Any, entries: list[Entry]) -> None:
        """Queue the ack, the delete and the depth decrement into a transaction."""
        ids = [e.entry_id for e in entries]
        pipe.xack(self._stream, GROUP, *ids)
        pipe.xdel(self._stream, *ids)
        pipe.decrby(self._settings.queue_depth_key, sum(e.count for e in entries))


def _entries(reply: Any) -> list[Entry]:
    out: list[Entry] = []
    for _stream, items in reply or []:
        out.extend(_entry(entry_id, fields) for entry_id, fields in items if fields)
    return out


def _entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Entry:
    return Entry(entry_id, int(fields[b"n"]), fields[b"b"])
