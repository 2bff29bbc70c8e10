"""Reading a long live tail in bounded calls: everything read, in order, the head copy read
after the last entry, and a rollover's trim between two calls counted by the newer head."""

from __future__ import annotations

import redis.asyncio as aioredis

from core import tail
from core.keys import partitions
from core.settings import load_settings
from scripts.stack import Stack
from tests.support import unique


async def test_a_long_tail_is_read_whole_in_bounded_calls(stack: Stack) -> None:
    settings = load_settings({"REDIS_URL": stack.redis_url, "STREAM_KEY": unique("tail"),
                              "STREAM_PARTITIONS": "2"})  # fmt: skip
    client = aioredis.Redis.from_url(stack.redis_url)
    parts = partitions(settings)
    account = unique("acc")
    head_key = f"{{{parts[0].tag}}}:head:{account}"
    try:
        ids: dict[int, list[bytes | str]] = {p.index: [] for p in parts}
        for n in range(23):
            part = parts[n % 2]
            blob = tail.encode(tail.TailEvents([1000 + n], ["login"], [f"u{n}"]))
            ids[part.index].append(await client.xadd(part.tail(account), {"e": blob}))
        await client.hset(head_key, mapping={"v": 1, "h": b"copy-1"})
        calls_before = (await client.info("commandstats")).get("cmdstat_eval", {}).get("calls", 0)
        read = await tail.read_tails(client, parts, account, head_key=head_key, chunk=4)
        calls = (await client.info("commandstats"))["cmdstat_eval"]["calls"] - calls_before
        assert sorted(e.events.users[0] for e in read.entries) == sorted(
            f"u{n}" for n in range(23))  # fmt: skip
        for index in (0, 1):  # each partition's entries in stream order
            mine = [e.entry_id for e in read.entries if e.partition == index]
            assert mine == [tail.parse_id(i) for i in ids[index]]
        assert calls == 4 + 3  # 12 entries by 4: 3 full reads and an empty one; 11: 4, 4, 3
        assert read.head == b"copy-1"
        # after a given entry: only newer ones
        newer = await tail.read_tails(client, parts[:1], account,
                                      {0: tail.parse_id(ids[0][5])}, head_key, chunk=4)  # fmt: skip
        assert [e.entry_id for e in newer.entries] == [tail.parse_id(i) for i in ids[0][6:]]
        assert newer.head == b"copy-1"
    finally:
        await client.delete(head_key, *(p.tail(account) for p in parts))
        await client.aclose()
