"""The producer against a real Redis: coalesced enqueues keep one reply per caller."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from core.connections import connect_redis
from core.keys import partitions
from core.settings import Settings, load_settings
from scripts.stack import Stack
from service import queue
from tests.support import eventually, unique


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


async def evalsha_calls(client: Any) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_one_tick_is_one_call_and_each_entry_is_judged_as_if_alone(stack: Stack) -> None:
    """Sizes against the bound skip the one that does not fit and take later ones that do;
    rate limits count per client within the call, as they would one call each."""
    limits = {"QUEUE_MAX_EVENTS": "2400", "RATE_LIMIT_EVENTS_PER_SECOND": "1000",
              "MAX_BATCH_EVENTS": "1000"}  # fmt: skip
    settings = producer_settings(stack, **limits)
    client = connect_redis(settings.redis_url)
    producer = queue.Producer(client, settings)
    part = partitions(settings)[0]
    try:
        await client.set(part.depth, 1)
        # (events, client): the bound is 2400 queued, the rate 1000 a second per client
        asked = [(600, "a"), (300, "b"), (401, "a"), (1000, "c"), (400, "a"), (100, "b"),
                 (100, "c")]  # fmt: skip
        expected = [queue.QUEUED, queue.QUEUED, queue.RATE_LIMITED, queue.QUEUED, queue.QUEUED,
                    queue.QUEUE_FULL, queue.RATE_LIMITED]  # fmt: skip
        # one second's rate-limit bucket for all: start early in a second
        await eventually(lambda: time.time() % 1 < 0.5, 2, 0.01, what="an early moment")
        calls_before = await evalsha_calls(client)
        outcomes = await asyncio.gather(
            *(producer.enqueue(f"[{n}]".encode(), n, "acc", who) for n, who in asked)
        )
        assert outcomes == expected
        assert await evalsha_calls(client) - calls_before == 1
        assert int(await client.get(part.depth) or 0) == 1 + 600 + 300 + 1000 + 400
        entries: Any = await client.xrange(part.stream)
        bodies = [fields[b"body"] for _, fields in entries]
        assert bodies == [b"[600]", b"[300]", b"[1000]", b"[400]"]
    finally:
        await client.delete(part.stream, part.depth)
        await client.aclose()
