"""The flusher, in-process against the real servers: stored once, counted once, depth exact.

Each test drives real stream entries through a real ``Flusher`` (or its
consumer directly, to stop exactly between two steps) and then reads what
landed: raw events in MongoDB, the accounts' live tails (what summaries and
rollups count), the depth counter and the stream.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core import keys, store
from core.events import decode_events, to_document
from core.settings import Settings
from service.flusher import Flusher, consumer_name
from service.queue import Consumer, Retirement
from tests.conftest import AppFactory
from tests.support import Backends, eventually, make_event, unique


def batch(account: str, numbers: range, user: str = "u1") -> list[dict[str, object]]:
    return [make_event(account, n, user=user) for n in numbers]


def settled(backends: Backends, account: str, stored: int):
    """Every entry retired and the expected number of events stored."""
    return lambda: (backends.count(account) == stored and backends.queue_depth() == 0
                    and backends.stream_entries() == 0 and backends.pending() == 0)  # fmt: skip


async def test_first_delivery_counts_the_new_events_only(app: AppFactory) -> None:
    running = await app()
    account = unique("acc")
    assert (await running.post(batch(account, range(5)))).status_code == 202
    # a client re-sends three of them with two new ones
    assert (await running.post(batch(account, range(2, 7)))).status_code == 202
    running.start_flusher()
    await eventually(settled(running.backends, account, 7), what="7 events stored")
    assert running.backends.tail_events(account) == 7  # each counted exactly once


async def test_the_batches_of_one_flush_make_one_tail_entry_per_account(app: AppFactory) -> None:
    """Summaries and rollovers read the tail entry by entry: under load one entry
    per account per flush instead of one per batch is ~20x fewer to read."""
    running = await app(flush_concurrency=1)
    first, second = unique("acc"), unique("acc")
    for n in range(0, 300, 10):  # 30 batches, both accounts in each
        both = batch(first, range(n, n + 5)) + batch(second, range(n, n + 5))
        assert (await running.post(both)).status_code == 202
    running.start_flusher()  # one lane, and every batch already waiting: one flush
    await eventually(lambda: running.backends.queue_depth() == 0, what="all 30 stored")
    for account in (first, second):
        assert running.backends.count(account) == 150
        assert running.backends.tail_events(account) == 150
        assert running.backends.tail_entries(account) == 1


@pytest.fixture
def instance() -> str:
    return unique("host")


async def test_an_entry_redelivered_after_a_crash_counts_what_it_stored_once(
    app: AppFactory, instance: str
) -> None:
    """A flusher died after storing part of a batch, before acknowledging it."""
    running = await app(instance_name=instance)
    account = unique("acc")
    assert (await running.post(batch(account, range(10)))).status_code == 202
    settings = running.settings
    crashed = Flusher(settings, slot=0)
    consumer = crashed.consumers[0]
    await consumer.ensure_group()
    [entry] = await consumer.read_new(10, None)
    docs = [to_document(e, entry.batch_id, datetime.now(UTC)) for e in decode_events(entry.body)]
    await store.insert_new(store.events(crashed.db), docs[:4])  # then the process died
    await crashed.close()
    assert running.backends.count(account) == 4 and running.backends.tail_events(account) == 0
    running.start_flusher(slot=0)  # the same name: it recovers its own pending entry
    await eventually(settled(running.backends, account, 10), what="the entry redone")
    assert running.backends.tail_events(account) == 10


async def test_an_entry_claimed_away_mid_write_is_counted_by_its_new_owner_only(
    app: AppFactory, instance: str
) -> None:
    """A slow flusher loses its entry to another (XAUTOCLAIM) after writing part of it."""
    running = await app(instance_name=instance, claim_idle_ms=200)
    account = unique("acc")
    assert (await running.post(batch(account, range(10)))).status_code == 202
    slow = Flusher(running.settings, slot=0)
    await slow.consumers[0].ensure_group()
    [entry] = await slow.consumers[0].read_new(10, None)
    docs = [to_document(e, entry.batch_id, datetime.now(UTC)) for e in decode_events(entry.body)]
    new = await store.insert_new(store.events(slow.db), docs[:6])
    # the other flusher claims it and stores it whole
    running.start_flusher(slot=1)
    await eventually(settled(running.backends, account, 10), 15, what="claimed and stored")
    # the slow one now finishes its write and tries to retire with its own count
    await store.insert_new(store.events(slow.db), docs)
    from service.flusher import tails_of

    stored = [docs[i] for i in sorted(new)]
    retired = await slow.consumers[0].retire([Retirement(entry, tails_of(stored))])
    await slow.close()
    assert retired == [False]  # no longer its entry: not acknowledged, not counted
    assert running.backends.tail_events(account) == 10
    assert running.backends.queue_depth() == 0


async def test_depth_only_shrinks_for_entries_really_acknowledged(app: AppFactory) -> None:
    running = await app()
    account = unique("acc")
    for start in (0, 10, 20):
        assert (await running.post(batch(account, range(start, start + 10)))).status_code == 202
    assert running.backends.queue_depth() == 30
    flusher = Flusher(running.settings)
    consumer = flusher.consumers[0]
    await consumer.ensure_group()
    entries = await consumer.read_new(10, None)
    assert len(entries) == 3
    first = [Retirement(entries[0])]
    assert await consumer.retire(first) == [True]
    assert running.backends.queue_depth() == 20
    # the same entry retired again (a duplicate delivery, a retried script)
    assert await consumer.retire(first) == [False]
    assert running.backends.queue_depth() == 20
    # a consumer that never owned an entry cannot retire it
    other = Consumer(flusher.redis, consumer.partition, "someone-else", running.settings)
    assert await other.retire([Retirement(entries[1])]) == [False]
    assert running.backends.queue_depth() == 20
    await flusher.close()


async def test_an_undecodable_entry_is_dead_lettered_with_its_reason(app: AppFactory) -> None:
    running = await app()
    part = keys.partitions(running.settings)[0]
    running.backends.redis.xadd(part.stream, {"count": 2, "body": b"not json"})
    running.backends.redis.incrby(part.depth, 2)
    running.start_flusher()
    await eventually(lambda: running.backends.dead_letters(), what="a dead letter")
    [(_, fields)] = running.backends.dead_letters()
    assert fields[b"body"] == b"not json" and b"undecodable" in fields[b"reason"]
    await eventually(lambda: running.backends.queue_depth() == 0, what="depth back to 0")
    assert running.backends.stream_entries() == 0


def test_consumer_names_are_unique_per_host_and_slot_and_stable(stack_settings: Settings) -> None:
    assert consumer_name("h1:8000", 0) != consumer_name("h1:8000", 1)
    assert consumer_name("h1:8000", 0) != consumer_name("h2:8000", 0)
    assert consumer_name("h1:8000", 1) == consumer_name("h1:8000", 1)  # after a restart
    assert stack_settings.instance.endswith(f":{stack_settings.port}")


@pytest.fixture
def stack_settings() -> Settings:
    from core.settings import load_settings

    return load_settings({})


async def test_a_backlog_of_big_batches_is_flushed_a_batch_size_at_a_time(app: AppFactory) -> None:
    """100 entries of 1,000 events must not become one insert of 100,000 documents."""
    running = await app(flush_batch_size=500)
    account = unique("big")
    for start in range(0, 20_000, 1000):
        assert (await running.post(batch(account, range(start, start + 1000)))).status_code == 202
    flusher = Flusher(running.settings)
    consumer = flusher.consumers[0]
    await consumer.ensure_group()
    sizes = []
    for _ in range(3):
        entries = await flusher._collect(consumer)
        sizes.append(sum(e.count for e in entries))
        await flusher.flush(consumer, entries)
    await flusher.close()
    assert sizes == [1000, 1000, 1000]  # one entry each: the first tells their size
