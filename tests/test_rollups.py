"""Invariants 3 and 4 for the rollups, in-process against the real servers.

Events go in through the real app and a real flusher (so the tails hold what
the flusher counted); a ``Roller`` is then driven to chosen minutes, and the
figures a summary would give at a chosen moment (``figures_at``) are compared
with the ground truth counted straight from the raw events.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from core import keys, tail
from core.buckets import HOUR, MINUTE, WINDOWS, floor, ms, to_datetime, window_start
from core.figures import Figures
from core.rollup_docs import document_of, read_head
from rollups import rollover
from rollups.lease import Leases, holder
from rollups.rollover import HeadConflict, Roller, next_change
from service.snapshot import Raced, Snapshot
from service.summary import figures_at
from tests.conftest import AppFactory, Running
from tests.oracle import ground_truth
from tests.support import drained, eventually, iso, unique

Doc = dict[str, Any]


def event(account: str, n: int, ts: datetime, user: str = "u1", type_: str = "login") -> Doc:
    return {"event_id": f"e{n}", "account_id": account, "user_id": user, "type": type_,
            "timestamp": iso(ts)}  # fmt: skip


async def store_all(running: Running, account: str, events: list[Doc], expected: int) -> None:
    for i in range(0, len(events), 100):
        response = await running.post(events[i : i + 100])
        assert response.status_code == 202, response.text
    await eventually(drained(running.backends, account, expected),
                     what=f"{expected} events stored")  # fmt: skip


async def figures(running: Running, account: str, window: str, to: int) -> Figures:
    """What /summary says for ``window`` at the moment ``to`` (epoch ms)."""
    read = await tail.read_tails(running.redis, keys.partitions(running.settings), account)
    return await figures_at(running.db, Snapshot(to, read.entries), account, window)


def truth(running: Running, account: str, window: str, to: int) -> dict[str, Any]:
    start = window_start(window, floor(to, "minute"))
    return ground_truth(running.backends.events, account, to_datetime(start), to_datetime(to), 100)


def as_dict(f: Figures) -> dict[str, Any]:
    body = f.body(100)
    return {k: body[k] for k in ("total", "totals", "unique_users", "top_users")}


async def assert_exact(running: Running, account: str, to: int) -> None:
    for window in WINDOWS:
        assert as_dict(await figures(running, account, window, to)) == truth(
            running, account, window, to
        ), window


def spread(account: str, now: datetime, count: int, span: timedelta) -> list[Doc]:
    """Events over ``span`` before now, several per minute, a handful of users."""
    seconds = int(span.total_seconds())
    return [event(account, i, now - timedelta(seconds=60 + i * 97 % seconds), f"user_{i % 7}",
                  ["login", "page_view"][i % 2]) for i in range(count)]  # fmt: skip


@pytest.fixture
async def running(app: AppFactory) -> Running:
    started = await app()
    started.start_flusher()
    return started


def snapshot(running: Running) -> dict[str, list[Doc]]:
    """Every rollup document: what "changes nothing" is checked against."""
    db = running.backends.db
    names = [keys.HEADS, keys.WINDOWS, keys.MINUTES, keys.HOURS]
    return {n: sorted(db[n].find(), key=lambda d: d["_id"]) for n in names}


async def test_rolling_twice_to_the_same_minute_changes_nothing(running: Running) -> None:
    now = datetime.now(UTC)
    account = unique("idem")
    await store_all(running, account, spread(account, now, 400, timedelta(hours=30)), 400)
    roller = Roller(running.db, running.redis, running.settings)
    minute = floor(ms(now), "minute")
    first = await roller.roll(account, minute)
    assert first is not None and first.events == 400
    before = snapshot(running)
    assert await roller.roll(account, minute) is None
    assert await Roller(running.db, running.redis, running.settings).roll(account, minute) is None
    assert snapshot(running) == before
    await assert_exact(running, account, ms(now))


async def test_figures_are_exact_before_during_and_after_rollovers(running: Running) -> None:
    """Late and re-sent events, windows moving on, rollovers at every step."""
    now = datetime.now(UTC)
    account = unique("exact")
    events = spread(account, now, 300, timedelta(hours=26))
    await store_all(running, account, events[:200], 200)
    to = ms(now)
    await assert_exact(running, account, to)  # nothing rolled yet: all from the tail
    roller = Roller(running.db, running.redis, running.settings)
    await roller.roll(account, floor(to, "minute"))
    await assert_exact(running, account, to)  # from the aggregates
    # late events into rolled-up minutes, plus re-sent ones
    await store_all(running, account, events[200:] + events[:30], 300)
    await assert_exact(running, account, to)  # aggregates + late tail
    await roller.roll(account, floor(to, "minute"))
    await assert_exact(running, account, to)
    # time moves on: every window sheds buckets; read both before and after rolling
    for later in (MINUTE, 7 * MINUTE, HOUR, 3 * HOUR, 20 * HOUR):
        moment = to + later
        await assert_exact(running, account, moment)  # the head is behind: buckets left
        await roller.roll(account, floor(moment, "minute"))
        await assert_exact(running, account, moment)


async def test_windows_share_one_document_while_small_and_stay_exact_either_way(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small account's six windows are one document (a window set); past
    ``WINDOW_SET_ENTRIES`` each window that moves gets its own (the others stay named in
    the set); and back: exact at every step, the superseded documents listed as retired."""
    now = datetime.now(UTC)
    account = unique("sets")
    events = [event(account, i, now - timedelta(minutes=2, seconds=i), f"user_{i % 7}",
                    ["login", "page_view"][i % 2]) for i in range(20)]  # fmt: skip
    events += [event(account, 20 + i, now - timedelta(minutes=14), f"user_{i}") for i in range(5)]
    events += [event(account, 30 + i, now - timedelta(hours=20, seconds=i)) for i in range(5)]
    await store_all(running, account, events, len(events))
    to, minute = ms(now), floor(ms(now), "minute")
    roller = Roller(running.db, running.redis, running.settings)

    def documents(head: Any) -> set[str]:
        return {document_of(ref) for ref in head.windows.values()}

    rolled = await roller.roll(account, minute)
    assert rolled is not None and len(rolled.head.windows) == len(WINDOWS)
    assert len(documents(rolled.head)) == 1 and rolled.documents["window"] == 1
    await assert_exact(running, account, to)
    monkeypatch.setattr(rollover, "WINDOW_SET_ENTRIES", 10)  # each window holds ~10
    before = rolled.head
    rolled = await roller.roll(account, minute + 3 * MINUTE)  # the 14-minute-old leave 15m
    assert rolled is not None
    assert [w for w, ref in rolled.head.windows.items() if "#" not in ref] == ["15m"]
    assert rolled.documents["window"] == 1
    assert {w: r for w, r in rolled.head.windows.items() if w != "15m"} == {
        w: r for w, r in before.windows.items() if w != "15m"}  # fmt: skip
    assert rolled.head.retired == []  # the set is still named
    await assert_exact(running, account, to + 3 * MINUTE)
    monkeypatch.undo()
    before = rolled.head
    rolled = await roller.roll(account, minute + 3 * HOUR)  # 15m and 1h move
    assert rolled is not None and len(documents(rolled.head)) == 1
    assert rolled.documents["window"] == 1
    assert {d for k, d in rolled.head.retired if k == "window"} == documents(before)
    await assert_exact(running, account, to + 3 * HOUR)


async def test_two_jobs_rolling_one_account_at_once_stay_exact(running: Running) -> None:
    now = datetime.now(UTC)
    account = unique("race")
    await store_all(running, account, spread(account, now, 200, timedelta(hours=3)), 200)
    minute = floor(ms(now), "minute")
    one = Roller(running.db, running.redis, running.settings)
    two = Roller(running.db, running.redis, running.settings)
    results = await asyncio.gather(one.roll(account, minute), two.roll(account, minute),
                                   return_exceptions=True)  # fmt: skip
    assert sum(isinstance(r, HeadConflict) for r in results) <= 1, results
    assert not any(isinstance(r, Exception) and not isinstance(r, HeadConflict) for r in results), (
        results
    )
    # the loser's documents are gone: only what the head names is left
    head = await read_head(running.db, account)
    assert head is not None
    named = {document_of(ref) for ref in head.windows.values()}
    assert {d["_id"] for d in running.backends.db[keys.WINDOWS].find()} == named
    await assert_exact(running, account, ms(now))
    for roller in (one, two):  # both can go on
        roller.forget_heads()
        await roller.roll(account, minute + MINUTE)
    await assert_exact(running, account, ms(now) + MINUTE)


async def test_a_reader_racing_a_rollover_reads_again(running: Running) -> None:
    now = datetime.now(UTC)
    account = unique("reader")
    await store_all(running, account, spread(account, now, 50, timedelta(hours=2)), 50)
    minute = floor(ms(now), "minute")
    roller = Roller(running.db, running.redis, running.settings)
    await roller.roll(account, minute + 2 * MINUTE)
    snap = await tail.read_tails(running.redis, keys.partitions(running.settings), account)
    with pytest.raises(Raced):  # the head is ahead of the reader's minute
        await figures_at(running.db, Snapshot(ms(now), snap.entries), account, "1h")


async def test_retention_edge_events_count_in_every_covering_window(app: AppFactory) -> None:
    """Accepted means counted: ±1 minute around the raw-retention bound."""
    running = await app()
    running.start_flusher()
    account = unique("edge")
    now = datetime.now(UTC)
    retention = timedelta(days=running.settings.raw_retention_days)
    inside = event(account, 1, now - retention + timedelta(minutes=1))
    outside = event(account, 2, now - retention - timedelta(minutes=1))
    # where the old rollup job stopped counting: retention minus 2 hours, ±1 minute
    margin = [event(account, 3 + i, now - retention + timedelta(hours=2, minutes=m))
              for i, m in enumerate((-1, 1))]  # fmt: skip
    assert (await running.post([outside])).status_code == 400
    assert (await running.post([inside, *margin])).status_code == 202
    await store_all(running, account, [], 3)
    roller = Roller(running.db, running.redis, running.settings)
    to = ms(now)
    for _ in range(2):  # counted from the tail, then from the rolled-up aggregates
        for window in ("7d", "30d"):
            assert (await figures(running, account, window, to)).total == 3, window
        await assert_exact(running, account, to)
        await roller.roll(account, floor(to, "minute"))


async def test_a_batch_resent_much_later_is_never_counted_twice(running: Running) -> None:
    now = datetime.now(UTC)
    account = unique("resend")
    first = [event(account, i, now - timedelta(minutes=3, seconds=i)) for i in range(20)]
    await store_all(running, account, first, 20)
    roller = Roller(running.db, running.redis, running.settings)
    await roller.roll(account, floor(ms(now), "minute"))
    assert running.backends.tail_events(account) == 0
    response = await running.post(first)  # 16+ minutes later in real life
    assert response.status_code == 202
    await eventually(lambda: running.backends.queue_depth() == 0, what="the resend flushed")
    assert running.backends.tail_events(account) == 0  # duplicates never enter the tail
    assert (await figures(running, account, "1h", ms(now))).total == 20


async def test_an_idle_account_is_scheduled_when_a_bucket_leaves_a_window(
    running: Running,
) -> None:
    now = datetime.now(UTC)
    account = unique("idle")
    await store_all(running, account, [event(account, 1, now - timedelta(minutes=5))], 1)
    roller = Roller(running.db, running.redis, running.settings)
    minute = floor(ms(now), "minute")
    rolled = await roller.roll(account, minute)
    assert rolled is not None
    bucket = floor(ms(now - timedelta(minutes=5)), "minute")
    assert next_change(rolled.head) == bucket + MINUTE + WINDOWS["15m"]


async def test_an_account_with_100k_users_in_one_hour(running: Running) -> None:
    """Per-user counts are one packed field, so a big hour is still one document."""
    now = datetime.now(UTC)
    account = unique("wide")
    events = [event(account, i, now - timedelta(minutes=2, seconds=i % 3000), f"user_{i}")
              for i in range(100_000)]  # fmt: skip
    for i in range(0, len(events), 1000):
        assert (await running.post(events[i : i + 1000])).status_code == 202
    await eventually(drained(running.backends, account, 100_000), 180, what="100k stored")
    roller = Roller(running.db, running.redis, running.settings)
    await roller.roll(account, floor(ms(now), "minute"))
    got = await figures(running, account, "24h", ms(now))
    assert got.total == 100_000 and got.unique_users == 100_000
    assert got.reads.documents == 2  # the head and one aggregate
    head = await read_head(running.db, account)  # too large to share one document
    assert head is not None and len({document_of(r) for r in head.windows.values()}) == 6


async def test_a_rollover_trims_more_tail_entries_than_lua_unpacks_at_once(
    running: Running,
) -> None:
    """A rollup job that was down for a while finds tens of thousands of tail
    entries; trimming them must not fail (Lua's unpack() takes ~8000 values), or
    the tail would never shrink again."""
    account = unique("long")
    part = keys.partition_of(running.settings, account)
    now = datetime.now(UTC)
    when = ms(now - timedelta(minutes=2))
    async with running.redis.pipeline(transaction=False) as pipe:
        for i in range(10_000):  # what 10,000 flushes would have appended
            blob = tail.encode(tail.TailEvents([when], ["login"], [f"u{i % 7}"]))
            pipe.xadd(part.tail(account), {"e": blob})
        await pipe.execute()
    roller = Roller(running.db, running.redis, running.settings)
    rolled = await roller.roll(account, floor(ms(now), "minute"))
    assert rolled is not None and rolled.events == 10_000
    assert await running.redis.xlen(part.tail(account)) == 0
    got = await figures(running, account, "24h", ms(now))
    assert (got.total, got.unique_users) == (10_000, 7)


async def test_a_lease_is_held_by_one_at_a_time_extended_released_and_lapses(
    running: Running,
) -> None:
    """rollups/lease.py: a second contender cannot take a partition while its holder
    renews it; it can once the holder lets go, or once the holder stops renewing and
    its ttl runs out, and then the old holder cannot renew it. Every taking gets a
    newer fencing token."""
    settings = running.settings
    one = Leases(running.redis, settings, "one", 0.5)
    two = Leases(running.redis, settings, "two", 0.5)
    assert await one.take([0], 1) and not await two.take([0], 0)
    first = one.held[0]
    for _ in range(3):  # extended for longer than the ttl: still one's
        await asyncio.sleep(0.2)
        assert await one.hold() and not await two.take([0], 0)
    assert holder(await running.redis.get(keys.rollup_lease(settings, 0))) == one.owner
    await one.release()
    assert await two.take([0], 0) and not await one.take([0], 0)
    assert two.held[0] > first

    async def one_takes() -> bool:
        return await one.take([0], 0)

    await eventually(one_takes, 5, 0.05, what="two's lease to lapse")
    assert one.held[0] > two.held[0]
    assert not await two.hold()  # one took it meanwhile
    await two.release()  # not two's: nothing happens
    assert holder(await running.redis.get(keys.rollup_lease(settings, 0))) == one.owner
