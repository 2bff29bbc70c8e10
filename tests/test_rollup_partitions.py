"""Rollup partitions (rollups/lease.py, rollups/batch.py): several rollups processes
share the accounts, a dead one's partitions are taken over within seconds, and a
process that lost its partition without knowing it can never publish a head over its
successor's (fencing). Against the real servers: leases and rollers in-process, and
two services' rollups processes, one of them SIGKILLed mid-pass."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient, monitoring

from core import keys
from core.buckets import MINUTE, WINDOWS, floor, ms
from core.rollup_docs import Head
from rollups.batch import PREFETCH_FROM, prefetch, roll_accounts
from rollups.lease import Leases, holder
from rollups.rollover import HeadConflict, Roller
from service.snapshot import read_snapshot
from service.summary import figures_at
from tests.conftest import AppFactory, Running, ServiceFactory
from tests.harness import Service
from tests.oracle import figures, ground_truth, parse_iso
from tests.support import Backends, drained, eventually, iso, unique, wait_for
from tests.test_rollups import as_dict, assert_exact, spread, store_all, truth
from tests.test_rollups import event as one_event

Doc = dict[str, Any]
PARTITIONS = 8


def accounts_over_partitions(settings: Any, per_partition: int, prefix: str) -> list[str]:
    """Fresh account names, ``per_partition`` in each rollup partition."""
    found: dict[int, list[str]] = {p: [] for p in range(settings.rollup_partitions)}
    while any(len(names) < per_partition for names in found.values()):
        name = unique(prefix)
        names = found[keys.rollup_partition_of(settings, name)]
        if len(names) < per_partition:
            names.append(name)
    return [name for names in found.values() for name in names]


@pytest.fixture
async def running(app: AppFactory) -> Running:
    started = await app(rollup_partitions=PARTITIONS)
    started.start_flusher()
    return started


async def test_processes_share_the_partitions_and_take_over_a_silent_ones(
    running: Running,
) -> None:
    """Two processes ticking share 8 partitions 4 and 4; one that stops ticking has its
    partitions taken over once its leases lapse, each under a newer fencing token; when
    it ticks again it learns it lost them."""
    one = Leases(running.redis, running.settings, "rollups", 1.0)
    two = Leases(running.redis, running.settings, "rollups", 1.0)
    try:
        gained, _ = await one.tick()
        assert gained == set(range(PARTITIONS))  # alone: all of them
        await two.tick()  # two alive now: one holds past its share, two gets none yet
        assert not two.held and two.alive == 2
        _, lost = await one.tick()  # one gives back past its share
        assert len(lost) == PARTITIONS // 2
        await two.tick()
        assert len(one.held) == len(two.held) == PARTITIONS // 2
        assert not set(one.held) & set(two.held)
        before = dict(one.held)

        async def two_holds_all() -> bool:
            await two.tick()
            return len(two.held) == PARTITIONS

        await eventually(two_holds_all, 10, 0.1, what="one's partitions taken over")
        assert all(two.held[p] > token for p, token in before.items())
        _, lost = await one.tick()  # back from its pause
        assert lost == set(before) and not one.held
    finally:
        await one.release()
        await two.release()


async def test_a_process_that_lost_its_partition_cannot_publish_over_its_successor(
    running: Running,
) -> None:
    """A process paused past its lease's TTL still believes it holds the partition; its
    successor has written a head since. Its next rollover of the account is refused
    (fenced): no head of its goes in, the tail keeps every entry, figures stay exact."""
    settings = running.settings
    now = datetime.now(UTC)
    account = unique("fence")
    partition = keys.rollup_partition_of(settings, account)
    minute = floor(ms(now), "minute")
    stale_lease = Leases(running.redis, settings, "rollups", 0.3)
    new_lease = Leases(running.redis, settings, "rollups", 30.0)
    stale, successor = (Roller(running.db, running.redis, settings) for _ in range(2))
    stale.fence, successor.fence = stale_lease.held, new_lease.held
    events = spread(account, now, 90, timedelta(hours=5))
    try:
        assert await stale_lease.take([partition], 1)
        await store_all(running, account, events[:30], 30)
        assert await stale.roll(account, minute) is not None
        # the stale process pauses: its lease lapses, the successor takes the partition
        assert await new_lease.take([partition], 5)
        assert new_lease.held[partition] > stale_lease.held[partition]
        await store_all(running, account, events[:60], 60)
        rolled = await successor.roll(account, minute)
        assert rolled is not None and rolled.head.fence == new_lease.held[partition]
        await store_all(running, account, events, 90)
        entries = running.backends.tail_entries(account)
        assert entries > 0
        for roller in (stale, Roller(running.db, running.redis, settings)):
            roller.fence = stale_lease.held  # still believes it holds the partition
            with pytest.raises(HeadConflict):
                await roller.roll(account, minute)
        heads = list(running.backends.db[keys.HEADS].find({"account_id": account}))
        newest = Head.from_document(max(heads, key=lambda d: d["version"]))
        assert newest.version == rolled.head.version and newest.fence == rolled.head.fence
        assert running.backends.tail_entries(account) == entries  # nothing trimmed
        await assert_exact(running, account, ms(now))
        assert await successor.roll(account, minute) is not None
        assert running.backends.tail_entries(account) == 0
        await assert_exact(running, account, ms(now))
    finally:
        await stale_lease.release()
        await new_lease.release()


async def test_a_batched_pass_over_every_partition_is_exact(running: Running) -> None:
    """rollups/batch.py over accounts of every partition, twice (the second pass finds
    nothing to do), and again once late events arrived: every window exact."""
    settings = running.settings
    now = datetime.now(UTC)
    accounts = accounts_over_partitions(settings, 3, "batch")
    for n, account in enumerate(accounts):
        await store_all(running, account, spread(account, now, 20 + n, timedelta(hours=30)),
                        20 + n)  # fmt: skip
    roller = Roller(running.db, running.redis, settings)
    minute = floor(ms(now), "minute")
    outcome = await roll_accounts(roller, accounts, minute)
    assert (outcome.rolled, outcome.failed) == (len(accounts), 0)
    again = await roll_accounts(roller, accounts, minute)
    assert (again.rolled, again.untouched, again.failed) == (0, len(accounts), 0)
    late = {a: spread(a, now, 50, timedelta(hours=30))[-10:] for a in accounts[::4]}
    for account, events in late.items():
        total = running.backends.count(account) + len(events)
        await store_all(running, account, events, total)
    outcome = await roll_accounts(roller, accounts, minute)
    assert (outcome.rolled, outcome.failed) == (len(late), 0)
    for account in accounts:
        assert running.backends.tail_entries(account) == 0
        await assert_exact(running, account, ms(now))


async def test_a_pass_trims_the_tail_a_dead_process_published_but_left(
    running: Running,
) -> None:
    """A process that published an account's head in the store and died before copying
    it to Redis (and before trimming) leaves entries the head applied, and readers
    holding the older copy; the pass of the process that takes the partition over finds
    nothing to roll for that minute, raises the copy, then trims (they wait for no other
    rollover, and keep the account in its dirty set). A read of the copy and the tail,
    as /summary's, stays exact at every step."""
    settings = running.settings
    now = datetime.now(UTC)
    account = unique("untrimmed")
    events = spread(account, now, 60, timedelta(hours=2))
    await store_all(running, account, events[:30], 30)
    minute = floor(ms(now), "minute")
    dead = Roller(running.db, running.redis, settings)
    assert await dead.roll(account, minute - MINUTE) is not None
    copy_key = keys.head_copy(settings, account)
    older_copy = await running.redis.hgetall(copy_key)
    await store_all(running, account, events, 60)
    head, entries = await dead.head(account), await dead.read_tail(account)
    assert await dead._roll(head, entries, minute, {}) is not None  # published, not trimmed
    await running.redis.hset(copy_key, mapping=older_copy)  # died before copying it
    assert running.backends.tail_entries(account) == len(entries) > 0
    await assert_exact_as_read(running, account)
    successor = Roller(running.db, running.redis, settings)
    outcome = await roll_accounts(successor, [account], minute)
    assert (outcome.rolled, outcome.untouched, outcome.failed) == (0, 1, 0)
    assert running.backends.tail_entries(account) == 0
    await assert_exact_as_read(running, account)
    await assert_exact(running, account, ms(now))


async def test_raising_copies_never_puts_back_a_lapsed_one(running: Running) -> None:
    """A head copy is raised only where one is kept: a lapsed copy stays lapsed (readers
    read the store's newest head), an older one is raised, a newer one stays."""
    settings = running.settings
    now = datetime.now(UTC)
    account = unique("copies")
    await store_all(running, account, spread(account, now, 10, timedelta(hours=1)), 10)
    roller = Roller(running.db, running.redis, settings)
    rolled = await roller.roll(account, floor(ms(now), "minute"))
    assert rolled is not None
    head, copy_key = rolled.head, keys.head_copy(settings, account)
    newer, newest = (replace(head, version=head.version + n) for n in (1, 2))
    await running.redis.delete(copy_key)
    await roller.raise_copies([head])
    assert not await running.redis.exists(copy_key)
    for kept, raised, expected in ((head, newer, newer), (newest, newer, newest)):
        await running.redis.hset(copy_key, mapping={"v": kept.version, "h": kept.copy()})
        await roller.raise_copies([raised])
        assert int(await running.redis.hget(copy_key, "v")) == expected.version


async def assert_exact_as_read(running: Running, account: str) -> None:
    """Every window as /summary reads it (the head's Redis copy with the tail, at the
    Redis clock) against the raw events."""
    for window in WINDOWS:
        snapshot = await read_snapshot(running.db, running.redis, running.settings, account)
        got = as_dict(await figures_at(running.db, snapshot, account, window))
        assert got == truth(running, account, window, snapshot.to), window


class ReturnedDocuments(monitoring.CommandListener):
    """How many documents the store returned to finds on one collection."""

    def __init__(self, collection: str) -> None:
        self.collection = collection
        self.finds: dict[int, bool] = {}  # request id -> a find on the collection
        self.returned = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command.get(event.command_name)
        self.finds[event.request_id] = (
            event.command_name in ("find", "getMore")
            and (name == self.collection or event.command.get("collection") == self.collection)
        )  # fmt: skip

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        if self.finds.pop(event.request_id, False):
            cursor = event.reply.get("cursor", {})
            self.returned += len(cursor.get("firstBatch", cursor.get("nextBatch", [])))

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.finds.pop(event.request_id, None)


async def test_a_pass_reads_ahead_only_its_partitions_buckets(running: Running) -> None:
    """The buckets leaving a window are read by start and rollup partition: one
    partition's pass reads its accounts' buckets, not every account's at that start
    (with K processes, K times the rows); buckets written under another
    ``ROLLUP_PARTITIONS`` are still found, by their start alone."""
    settings = running.settings
    minute = floor(ms(datetime.now(UTC)), "minute")
    leaving = minute - WINDOWS["15m"]  # leaves the 15m window at the next minute
    per_partition = {0: [], 1: []}  # type: dict[int, list[str]]
    while any(len(names) < PREFETCH_FROM for names in per_partition.values()):
        name = unique("ahead")
        names = per_partition.get(keys.rollup_partition_of(settings, name))
        if names is not None and len(names) < PREFETCH_FROM:
            names.append(name)
    ours, moved = per_partition[0], per_partition[1]
    when = datetime.fromtimestamp((leaving + 5_000) / 1000, UTC)
    response = await running.post([one_event(a, 0, when) for a in ours + moved])
    assert response.status_code == 202, response.text
    for account in ours + moved:
        await eventually(drained(running.backends, account, 1), what=f"{account} stored")
    # ``moved`` were rolled under another layout (4 partitions) before a change to 8
    other_layout = replace(settings, rollup_partitions=4)
    for roller, accounts in ((Roller(running.db, running.redis, settings), ours),
                             (Roller(running.db, running.redis, other_layout), moved)):  # fmt: skip
        outcome = await roll_accounts(roller, accounts, minute)
        assert (outcome.rolled, outcome.failed) == (len(accounts), 0)
    for account, layout in [(a, settings) for a in ours] + [(a, other_layout) for a in moved]:
        doc = await running.db[keys.MINUTES].find_one({"account_id": account})
        assert doc is not None and doc["rollup_partition"] == keys.rollup_lane(
            layout, keys.rollup_partition_of(layout, account)
        )
    listener = ReturnedDocuments(keys.MINUTES)
    client: AsyncMongoClient[Doc] = AsyncMongoClient(settings.mongo_url,
                                                     event_listeners=[listener])  # fmt: skip
    try:
        fresh = Roller(client[settings.mongo_db], running.redis, settings)  # nothing cached
        heads = await fresh.heads_of(ours)
        assert await prefetch(fresh, heads.values(), minute + MINUTE) == len(ours)
        assert listener.returned == len(ours)  # not ``moved``'s, at the same start
        assert {i.partition("|")[0] for i in fresh.prefetched} == set(ours)
        heads = await fresh.heads_of(moved)
        assert await prefetch(fresh, heads.values(), minute + MINUTE) == len(moved)
        assert {i.partition("|")[0] for i in fresh.prefetched} == set(ours + moved)
    finally:
        await client.close()


# -- two services' rollups processes, one killed mid-pass ---------------------------------


def holders(backends: Backends) -> dict[int, str | None]:
    s = backends.settings
    return {p: holder(backends.redis.get(keys.rollup_lease(s, p))) for p in range(PARTITIONS)}


def progress(backends: Backends) -> dict[int, int]:
    s = backends.settings
    got = [backends.redis.get(keys.rollup_progress(s, p)) for p in range(PARTITIONS)]
    return {p: int(m or 0) for p, m in enumerate(got)}


def owned_by(service: Service, found: dict[int, str | None]) -> set[int]:
    """The partitions whose lease names this service's rollups process."""
    pids = {str(pid) for pid in service.pids_titled("rollups")}
    return {p for p, who in found.items() if who and who.split(":")[2] in pids}


def redis_minute(backends: Backends) -> int:
    seconds, micros = backends.redis.time()
    return floor(seconds * 1000 + micros // 1000, "minute")


def minute_began(backends: Backends, minute: int) -> bool:
    return redis_minute(backends) >= minute


def heads_seen(backends: Backends, accounts: list[str], into: dict[tuple[str, int], Doc]) -> None:
    for doc in backends.db[keys.HEADS].find({"account_id": {"$in": accounts}},
                                            {"account_id": 1, "version": 1, "minute": 1,
                                             "fence": 1, "applied": 1}):  # fmt: skip
        into[(doc["account_id"], doc["version"])] = doc


def kill_mid_pass(victim: Service, backends: Backends, mine: set[int], minute: int) -> bool:
    """SIGKILL the victim's rollups process once its pass to ``minute`` has finished some
    but not all of its partitions (then the rest of the service, so nothing restarts
    it); False if the pass was never caught in between."""
    deadline = time.monotonic() + 50
    while time.monotonic() < deadline:
        done = {p for p, m in progress(backends).items() if p in mine and m >= minute}
        if done == mine:
            return False
        if done:
            for pid in victim.pids_titled("rollups"):
                os.kill(pid, signal.SIGKILL)
            for pid in victim.pids():
                os.kill(pid, signal.SIGKILL)
            return True
        time.sleep(0.01)
    return False


def test_two_rollups_processes_share_8_partitions_and_one_killed_mid_pass_loses_nothing(
    start_service: ServiceFactory,
) -> None:
    """Two services share one database and 8 rollup partitions, 4 each. Many accounts
    are due at a minute; one service's rollups process is SIGKILLed (with its service)
    mid-pass. Its partitions are taken over within seconds and rolled to that minute;
    every window of every checked account is exact against the raw events, every tail
    applied, and no account has two heads for the same minute and tail position (no
    rollover done twice), nor a head under an older token than the one before it."""
    first, backends = start_service(rollup_interval_seconds=0.5, rollup_partitions=PARTITIONS)
    second, _ = start_service(rollup_interval_seconds=0.5, rollup_partitions=PARTITIONS,
                              roles="http,rollups", mongo_db=backends.db_name,
                              stream_key=backends.stream)  # fmt: skip
    wait_for(lambda: len(owned_by(first, h := holders(backends))) == len(owned_by(second, h))
             == PARTITIONS // 2, 30, 0.1, what="the partitions shared 4 and 4")  # fmt: skip
    checked = accounts_over_partitions(backends.settings, 2, "multi")
    seen: dict[tuple[str, int], Doc] = {}
    sent: dict[str, int] = dict.fromkeys(checked, 0)
    caught = False
    for attempt in range(3):  # a pass not caught midway: again at the next minute
        now = datetime.now(UTC)
        batch = [{"event_id": f"a{attempt}e{i}", "account_id": checked[i % len(checked)],
                  "user_id": f"u{i % 9}", "type": ["login", "page_view", "call_made"][i % 3],
                  "timestamp": iso(now - timedelta(minutes=i * 37 % 2800))}
                 for i in range(800)]  # fmt: skip
        # many accounts due at the next minute: a pass long enough to be caught midway
        fillers = [{"event_id": "f", "account_id": unique(f"fill{attempt}"), "user_id": "u",
                    "type": "login", "timestamp": iso(now)} for _ in range(3000)]  # fmt: skip
        for start in range(0, 3000, 1000):
            assert first.post(fillers[start : start + 1000]).status_code == 202
        assert first.post(batch).status_code == 202
        for event in batch:
            sent[event["account_id"]] += 1
        for account, count in sent.items():
            wait_for(drained(backends, account, count), 60, what="all events stored")
        wait_for(lambda: backends.queue_depth() == 0, 60, what="every filler stored")
        heads_seen(backends, checked, seen)
        minute = redis_minute(backends) + MINUTE
        mine = owned_by(second, holders(backends))
        assert len(mine) == PARTITIONS // 2
        wait_for(partial(minute_began, backends, minute), 70, 0.01, what="the next minute")
        if kill_mid_pass(second, backends, mine, minute):
            caught = True
            break
    assert caught, "the killed process's pass was never caught midway"
    second.proc.wait(10)  # type: ignore[union-attr]
    killed_at = time.monotonic()
    # its leases lapse (10 s) and the survivor takes them, then rolls them to the minute
    wait_for(lambda: len(owned_by(first, holders(backends))) == PARTITIONS, 30, 0.1,
             what="every partition taken over")  # fmt: skip
    wait_for(lambda: all(m >= minute for m in progress(backends).values()), 60, 0.1,
             what="every partition rolled to the minute")  # fmt: skip
    assert time.monotonic() - killed_at < 25
    heads_seen(backends, checked, seen)
    for account in checked:
        assert backends.tail_entries(account) == 0, account  # every entry applied
        for window in WINDOWS:
            got = httpx.get(f"{first.url}/summary/{account}", params={"window": window}).json()
            truth = ground_truth(backends.events, account, parse_iso(got["from"]),
                                 parse_iso(got["to"]), 5)  # fmt: skip
            assert figures(got) == truth, (account, window)
    for account in checked:
        versions = sorted((v, d) for (a, v), d in seen.items() if a == account)
        heads = [d for _, d in versions]
        positions = [(d["minute"], tuple(sorted(d["applied"].items()))) for d in heads]
        assert len(positions) == len(set(positions)), (account, positions)
        tokens = [d["fence"] for d in heads]
        assert tokens == sorted(tokens), (account, tokens)
    lag = httpx.get(f"{first.url}/metrics").text
    for p in range(PARTITIONS):
        assert f'rollup_lag_seconds{{partition="{p}"}}' in lag, p
