"""Redis lost, MongoDB kept: the backfill recounts from raw events instead of taking them
all for queued ones, and every account goes back on the rollups schedule."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from core import keys
from core.buckets import floor, ms
from rollups.backfill import Backfill
from rollups.reschedule import reschedule_if_lost
from rollups.rollover import Roller
from scripts.stack import Stack
from tests.conftest import AppFactory, Running, apps_on
from tests.oracle import figures, ground_truth, parse_iso
from tests.support import drained, eventually, make_event, unique

WINDOWS = ("15m", "1h", "6h", "24h")


@pytest.fixture
async def own_app(own_stack: Stack) -> AsyncIterator[AppFactory]:
    async for factory in apps_on(own_stack):
        yield factory


def lose_redis(stack: Stack) -> None:
    """Stop Redis, delete every byte it kept, start it empty on the same port."""
    assert stack.redis is not None
    stack.redis.stop()
    for item in stack.redis.data_dir.iterdir():
        if item.name != "redis.log":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    stack.redis.start()


async def wrong_windows(running: Running, account: str) -> list[str]:
    wrong = []
    for window in WINDOWS:
        got = (await running.client.get(f"/summary/{account}", params={"window": window})).json()
        truth = ground_truth(running.backends.events, account, parse_iso(got["from"]),
                             parse_iso(got["to"]), 5)  # fmt: skip
        if figures(got) != truth:
            wrong.append(f"{window}: {figures(got)['total']} != {truth['total']}")
    return wrong


async def test_after_a_redis_loss_the_backfill_recounts_and_reschedules(
    own_app: AppFactory, own_stack: Stack
) -> None:
    running = await own_app()
    running.start_flusher()
    rolled, unrolled = unique("rolled"), unique("unrolled")
    now = datetime.now(UTC)
    # events in buckets, and events still in the (lost) tail only
    a = [make_event(rolled, n, ts=now - timedelta(minutes=10 + n)) for n in range(30)]
    assert (await running.post(a)).status_code == 202
    await eventually(drained(running.backends, rolled, 30))
    minute = floor(ms(now), "minute")
    await Roller(running.db, running.redis, running.settings).roll(rolled, minute)
    await reschedule_if_lost(running.db, running.redis, running.settings)  # marker made
    b = [make_event(unrolled, n, ts=now - timedelta(minutes=5 + n)) for n in range(20)]
    assert (await running.post(b)).status_code == 202
    await eventually(drained(running.backends, unrolled, 20))
    await running.stop_workers()
    lose_redis(own_stack)
    running.start_flusher()  # makes the stream and its group again
    await eventually(lambda: running.backends.redis.exists(running.backends.partitions[0].stream))
    # the unrolled events' tail is gone: their account reads low until a backfill
    assert await wrong_windows(running, unrolled)
    backfill = Backfill(running.db, running.redis, running.settings)
    report = await backfill.run(now - timedelta(hours=2), now + timedelta(hours=1))
    assert report.events == 50  # every raw event recounted, none taken for a queued one
    for account in (rolled, unrolled):
        assert not await wrong_windows(running, account), account
    # the schedule went with Redis: every account with a head is due again
    assert await reschedule_if_lost(running.db, running.redis, running.settings) >= 2
    for account in (rolled, unrolled):
        partition = keys.rollup_partition_of(running.settings, account)
        schedule = keys.rollup_schedule(running.settings, partition)
        assert running.backends.redis.zscore(schedule, account) == 0, account
    assert await reschedule_if_lost(running.db, running.redis, running.settings) == 0
