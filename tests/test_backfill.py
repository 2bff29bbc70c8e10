"""Invariant 4 for the backfill: idempotent, repairs what differs from raw, resumes, refuses.

In-process against the real servers, with the app and a flusher running, so
the backfill is also checked against ingestion going on at the same time.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from core import store
from core.buckets import floor, ms, to_datetime
from core.events import Event, to_document
from rollups.backfill import Backfill, RangeRefused, Report
from rollups.rollover import Roller
from scripts.stack import ROOT
from tests.conftest import AppFactory, Running
from tests.support import eventually, minute_with_room, unique
from tests.test_rollups import assert_exact, event, snapshot, spread, store_all


@pytest.fixture
async def running(app: AppFactory) -> Running:
    started = await app()
    started.start_flusher()
    return started


def hours_back(now: datetime, hours: int) -> tuple[datetime, datetime]:
    return now - timedelta(hours=hours), now


async def rolled(running: Running, account: str, events: list[dict[str, Any]]) -> int:
    await store_all(running, account, events, len({e["event_id"] for e in events}))
    minute = floor(ms(datetime.now(UTC)), "minute")
    await Roller(running.db, running.redis, running.settings).roll(account, minute)
    return minute


async def test_backfill_over_a_correct_range_changes_nothing(running: Running) -> None:
    # the backfill first rolls every account to the current minute: in the next one,
    # that moves its windows (a change, rightly), so the whole test runs in one minute
    await minute_with_room(20)
    now = datetime.now(UTC)
    account = unique("bf")
    await rolled(running, account, spread(account, now, 300, timedelta(hours=20)))
    before = snapshot(running)
    backfill = Backfill(running.db, running.redis, running.settings)
    start, end = hours_back(now, 22)
    report = await backfill.run(start, end)
    assert report.minutes_corrected == 0 and report.events == 300
    assert snapshot(running) == before
    again = await backfill.run(start, end, account=account)
    assert again.minutes_corrected == 0 and snapshot(running) == before


async def test_backfill_makes_the_rollups_agree_with_raw_events(running: Running) -> None:
    """Events restored into MongoDB behind the service's back, and events deleted."""
    now = datetime.now(UTC)
    account = unique("repair")
    await rolled(running, account, spread(account, now, 200, timedelta(hours=10)))
    restored = [
        to_document(Event(event_id=f"r{i}", account_id=account, user_id=f"old_{i % 3}",
                          type="login", timestamp=now - timedelta(hours=3, minutes=i)),
                    "restored", now)
        for i in range(40)
    ]  # fmt: skip
    await store.insert_new(store.events(running.db), restored)
    await store.events(running.db).delete_many({"account_id": account, "event_id": "e5"})
    backfill = Backfill(running.db, running.redis, running.settings)
    start, end = hours_back(now, 12)
    report = await backfill.run(start, end, account=account)
    assert report.minutes_corrected >= 41
    await assert_exact(running, account, ms(now))
    repeat = await backfill.run(start, end, account=account)
    assert repeat.minutes_corrected == 0


async def test_backfill_while_events_keep_arriving_stays_exact(running: Running) -> None:
    now = datetime.now(UTC)
    account = unique("live")
    await rolled(running, account, spread(account, now, 100, timedelta(hours=2)))
    more = [event(account, 1000 + i, now - timedelta(minutes=i % 90)) for i in range(300)]

    async def keep_posting() -> None:
        for i in range(0, len(more), 10):
            assert (await running.post(more[i : i + 10])).status_code == 202
            await asyncio.sleep(0.01)

    backfill = Backfill(running.db, running.redis, running.settings)
    start, end = hours_back(now, 3)
    _, report = await asyncio.gather(keep_posting(), backfill.run(start, end, account=account))
    assert report.minutes_corrected == 0  # nothing was wrong; nothing in flight was miscounted
    await eventually(lambda: running.backends.queue_depth() == 0, what="the posts stored")
    await assert_exact(running, account, ms(datetime.now(UTC)))


async def test_an_interrupted_backfill_resumes_after_its_last_hour(running: Running) -> None:
    now = datetime.now(UTC)
    account = unique("resume")
    await rolled(running, account, spread(account, now, 100, timedelta(hours=5)))
    backfill = Backfill(running.db, running.redis, running.settings)
    start, end = hours_back(now, 6)
    seen: list[int] = []

    def interrupt(report: Report) -> None:
        seen.append(report.hours_done)
        if report.hours_done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await backfill.run(start, end, account=account, progress=interrupt)
    await backfill.lease.release()
    resumed = await backfill.run(start, end, account=account)
    assert resumed.hours_skipped == 3 and resumed.hours_done == resumed.hours_total


async def test_backfill_refuses_ranges_raw_retention_may_have_emptied(running: Running) -> None:
    backfill = Backfill(running.db, running.redis, running.settings)
    now = datetime.now(UTC)
    with pytest.raises(RangeRefused, match="earliest safe --from"):
        await backfill.run(now - timedelta(days=7), now)
    with pytest.raises(RangeRefused, match="after --from"):
        await backfill.run(now, now - timedelta(hours=1))
    env = {"MONGO_URL": running.settings.mongo_url, "REDIS_URL": running.settings.redis_url,
           "MONGO_DB": running.settings.mongo_db, "PATH": "/usr/bin:/bin"}  # fmt: skip
    old = to_datetime(floor(ms(now - timedelta(days=8)), "hour")).isoformat()
    cli = subprocess.run(
        [sys.executable, "-m", "scripts.backfill_rollups", "--from", old, "--to", now.isoformat()],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 2 and "earliest safe --from" in cli.stderr
