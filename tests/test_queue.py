"""The producer against a real Redis: coalesced enqueues keep one reply per caller."""

from __future__ import annotations

import asyncio
from typing import Any

from core.connections import connect_redis
from core.keys import partitions
from core.settings import Settings, load_settings
from scripts.stack import Stack
from service import queue
from tests.support import unique


def producer_settings(stack: Stack, **env: str) -> Settings:
    return load_settings({"REDIS_URL": stack.redis_url, "STREAM_KEY": unique("q"), **env})


async def test_concurrent_enqueues_each_get_their_own_answer(stack: Stack) -> None:
    # 20 batches of 5 events arrive in one tick against a bound of 50 events:
    # the script runs them in order, so exactly the first 10 fit
    settings = producer_settings(stack, QUEUE_MAX_EVENTS="50")
    client = connect_redis(settings.redis_url)
    producer = queue.Producer(client, settings)
    part = partitions(settings)[0]
    try:
        await client.set(part.depth, 1)  # the bound applies once non-empty
        bodies = [f"[{i}]".encode() for i in range(20)]
        outcomes = await asyncio.gather(*(producer.enqueue(b, 5, "acc", "c") for b in bodies))
        assert outcomes == [queue.QUEUED] * 9 + [queue.QUEUE_FULL] * 11
        entries: Any = await client.xrange(part.stream)
        assert [fields[b"body"] for _, fields in entries] == bodies[:9]
        assert int(await client.get(part.depth) or 0) == 1 + 9 * 5
    finally:
        await client.delete(part.stream, part.depth)
        await client.aclose()


async def test_a_forgotten_script_is_loaded_again(stack: Stack) -> None:
    """A restarted Redis has no scripts; the enqueue must load it, not fail."""
    settings = producer_settings(stack)
    client = connect_redis(settings.redis_url)
    producer = queue.Producer(client, settings)
    part = partitions(settings)[0]
    try:
        await client.script_flush()
        outcomes = await asyncio.gather(
            *(producer.enqueue(b"[1]", 1, "acc", "c") for _ in range(3))
        )
        assert outcomes == [queue.QUEUED] * 3
        assert await client.xlen(part.stream) == 3
    finally:
        await client.delete(part.stream, part.depth)
        await client.aclose()
