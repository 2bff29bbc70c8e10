"""Retiring a large flush in one call (issue 20, item 6), and the bound on FLUSH_BATCH_SIZE.

Lua's ``unpack`` refuses more than ~8,000 values at once: a flush of 10,000
one-event entries once made the acknowledge script fail on every attempt, so the
flusher crash-looped with the entries forever pending.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from core import keys
from core.connections import connect_redis
from core.settings import SettingsError, load_settings
from core.tail import TailEvents, parse_entries
from scripts.stack import Stack
from service.queue import Consumer, Retirement
from tests.support import unique

ENTRIES = 10_000


async def test_ten_thousand_one_event_entries_retire_in_one_call(stack: Stack) -> None:
    settings = load_settings({"REDIS_URL": stack.redis_url, "STREAM_KEY": unique("retire")})
    client = connect_redis(settings.redis_url)
    part = keys.partitions(settings)[0]
    try:
        pipe = client.pipeline(transaction=False)
        for n in range(ENTRIES):
            pipe.xadd(part.stream, {"count": 1, "body": f'[{{"n":{n}}}]'})
        pipe.set(part.depth, ENTRIES)
        await pipe.execute()
        consumer = Consumer(client, part, "flusher-under-test", settings)
        await consumer.ensure_group()
        entries = await consumer.read_new(ENTRIES, None)
        assert len(entries) == ENTRIES
        now = int(time.time() * 1000)
        accounts = ["acc_a", "acc_b"]
        retirements = [
            Retirement(e, {accounts[i % 2]: TailEvents([now], ["page_view"], [f"u{i}"])})
            for i, e in enumerate(entries)
        ]
        assert await consumer.retire(retirements) == [True] * ENTRIES
        assert await client.xlen(part.stream) == 0
        assert int(await client.get(part.depth) or 0) == 0
        pending: Any = await client.xpending(part.stream, keys.GROUP)
        assert pending["pending"] == 0
        for account in accounts:  # one tail entry per account, holding every event
            reply: Any = await client.xrange(part.tail(account))
            [entry] = parse_entries(part.index, reply)
            assert len(entry.events.ts) == ENTRIES // 2
        dirty = keys.dirty_set(settings, part, 0)
        assert set(await client.smembers(dirty)) == {a.encode() for a in accounts}
    finally:
        await client.delete(part.stream, part.depth, keys.dirty_set(settings, part, 0),
                            *(part.tail(a) for a in ("acc_a", "acc_b")))  # fmt: skip
        await client.aclose()


def test_flush_batch_size_is_bounded() -> None:
    assert load_settings({"FLUSH_BATCH_SIZE": "10000"}).flush_batch_size == 10_000
    with pytest.raises(SettingsError, match=r"FLUSH_BATCH_SIZE must be 1\.\.10000"):
        load_settings({"FLUSH_BATCH_SIZE": "10001"})
    with pytest.raises(SettingsError, match="FLUSH_BATCH_SIZE"):
        load_settings({"FLUSH_BATCH_SIZE": "0"})
