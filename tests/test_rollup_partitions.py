"""Rollup partitions (rollups/lease.py, rollups/batch.py): several rollups processes
share the accounts, a dead one's partitions are taken over within seconds, and a
process that lost its partition without knowing it can never publish a head over its
successor's (fencing). Against the real servers: leases and rollers in-process, and
two services' rollups processes, one of them SIGKILLed mid-pass."""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import httpx
import pytest

from core import keys
from core.buckets import MINUTE, WINDOWS, floor, ms
from core.rollup_docs import Head
from rollups.batch import roll_accounts
from rollups.lease import Leases, holder
from rollups.rollover import HeadConflict, Roller
from tests.conftest import AppFactory, Running, ServiceFactory
from tests.harness import Service
from tests.oracle import figures, ground_truth, parse_iso
from tests.support import Backends, drained, eventually, iso, unique, wait_for
from tests.test_rollups import assert_exact, spread, store_all

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
