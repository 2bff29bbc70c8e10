"""The producer against a real Redis: coalesced enqueues keep one reply per caller."""

from __future__ import annotations

import asyncio
from typing import Any

from core.connections import connect_redis
from core.keys import partitions
from core.settings import Settings, load_settings
from scripts.stack import Stack
from service import queue
from service.quotas import ACCOUNT_TYPES, CLIENT_RATE, COUNTER, SET, Check
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
        outcomes = await asyncio.gather(*(producer.enqueue(part, b, 5) for b in bodies))
        assert [o for o, _ in outcomes] == [queue.QUEUED] * 9 + [queue.QUEUE_FULL] * 11
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
        outcomes = await asyncio.gather(*(producer.enqueue(part, b"[1]", 1) for _ in range(3)))
        assert [o for o, _ in outcomes] == [queue.QUEUED] * 3
        assert await client.xlen(part.stream) == 3
    finally:
        await client.delete(part.stream, part.depth)
        await client.aclose()


async def evalsha_calls(client: Any) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_one_tick_is_one_call_and_each_entry_is_judged_as_if_alone(stack: Stack) -> None:
    """Sizes against the bound skip the one that does not fit and take later ones that do;
    count and set limits hold within the call as they would one call each."""
    settings = producer_settings(stack, QUEUE_MAX_EVENTS="2000")
    client = connect_redis(settings.redis_url)
    producer = queue.Producer(client, settings)
    part = partitions(settings)[0]
    rate = {who: part.rate(who, 0) for who in "abc"}
    types = part.account_types("acc", 0)

    def limits(who: str, events: int, kinds: tuple[str, ...] = ()) -> list[Check]:
        out = [Check(COUNTER, rate[who], 1000, 60, CLIENT_RATE, who, add=events)]
        if kinds:
            out.append(Check(SET, types, 2, 60, ACCOUNT_TYPES, "acc", members=kinds))
        return out

    try:
        await client.set(part.depth, 1)
        # (events, client, types): the bound is 2000 queued, 1000 events per client, and
        # at most 2 distinct types
        asked = [(600, "a", ("t1",)), (300, "b", ()), (401, "a", ()), (1000, "c", ("t2",)),
                 (400, "a", ("t1", "t3")), (100, "b", ("t2",)), (100, "c", ()),
                 (1, "b", ("t1", "t2"))]  # fmt: skip
        expected = [(queue.QUEUED, 0), (queue.QUEUED, 0), (CLIENT_RATE, 1), (queue.QUEUED, 0),
                    (ACCOUNT_TYPES, 2), (queue.QUEUE_FULL, 0), (CLIENT_RATE, 1),
                    (queue.QUEUED, 0)]  # fmt: skip
        calls_before = await evalsha_calls(client)
        outcomes = await asyncio.gather(*(
            producer.enqueue(part, f"[{n}]".encode(), n, limits(who, n, kinds))
            for n, who, kinds in asked))  # fmt: skip
        assert outcomes == expected
        assert await evalsha_calls(client) - calls_before == 1
        assert int(await client.get(part.depth) or 0) == 1 + 600 + 300 + 1000 + 1
        entries: Any = await client.xrange(part.stream)
        assert [fields[b"body"] for _, fields in entries] == [b"[600]", b"[300]", b"[1000]", b"[1]"]
        assert {int(await client.get(rate[w]) or 0) for w in "abc"} == {600, 301, 1000}
        assert await client.smembers(types) == {b"t1", b"t2"}
        assert 0 < await client.ttl(types) <= 60
    finally:
        await client.delete(part.stream, part.depth, types, *rate.values())
        await client.aclose()
