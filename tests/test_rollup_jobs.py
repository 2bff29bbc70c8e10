"""Invariant 4 and the rollup job's guarantees, run in-process against the real servers.

The job and the backfill are called directly (with a chosen "now"), so each
test controls exactly when a run happens; the summary is then read over HTTP
from a real service on the same database with its own scheduler switched off.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import bson
import httpx
import pymongo
import pytest
from pymongo import AsyncMongoClient

from rollups import jobs
from rollups import store as rollup_store
from rollups.backfill import Report, backfill
from rollups.buckets import WINDOWS, Counts, floor, newest_versions
from scripts.stack import ROOT, Stack
from service import store
from service.config import Settings, load_settings
from service.summary import compute
from tests.conftest import ServiceFactory
from tests.rollup_support import figures, ground_truth, parse_iso, raw_document
from tests.support import unique

Doc = dict[str, Any]


@pytest.fixture
def db_name() -> str:
    return unique("rollups")


@pytest.fixture
def settings(stack: Stack, db_name: str) -> Settings:
    return load_settings({"MONGO_URL": stack.mongo_url, "MONGO_DB": db_name,
                          "REDIS_URL": stack.redis_url})  # fmt: skip


@pytest.fixture
async def adb(settings: Settings) -> AsyncIterator[Any]:
    client: AsyncMongoClient[Doc] = store.connect(settings, 120)
    db = store.database(client, settings)
    await store.ensure_event_indexes(db, settings)
    await rollup_store.ensure_indexes(db)
    yield db
    await client.drop_database(settings.mongo_db)
    await client.close()


@pytest.fixture
def sdb(stack: Stack, db_name: str) -> Iterator[pymongo.database.Database[Doc]]:
    client: pymongo.MongoClient[Doc] = pymongo.MongoClient(stack.mongo_url, tz_aware=True)
    yield client[db_name]
    client.close()


def snapshot(sdb: pymongo.database.Database[Doc]) -> dict[str, list[Doc]]:
    """Every rollup document, byte for byte: what "changes nothing" is checked against."""
    names = ["rollups_minute", "rollups_hour", "rollups_minute_users", "rollups_hour_users"]
    return {n: sorted(sdb[n].find(), key=lambda d: d["_id"]) for n in names}


def contents(sdb: pymongo.database.Database[Doc]) -> dict[str, dict[str, tuple[Any, ...]]]:
    """What the current bucket versions say, whatever their version ids."""
    view: dict[str, dict[str, tuple[Any, ...]]] = {}
    for name in ("rollups_minute", "rollups_hour"):
        current = newest_versions(sdb[name].find())
        view[name] = {d["key"]: (d["total"], d["types"], d["users"], d["unique_users"])
                      for d in current if d["total"]}  # fmt: skip
    return view


async def seed(db: Any, docs: list[Doc]) -> None:
    """Store raw events the way the flusher does: into events and events_recent."""
    for i in range(0, len(docs), 5000):
        await store.insert_events(store.events(db), docs[i : i + 5000])
        await store.insert_events(store.recent(db), docs[i : i + 5000])


def spread_events(account: str, now: datetime, count: int, ingested_at: datetime) -> list[Doc]:
    """Events over the last ~30 hours, several per minute, a handful of users."""
    return [
        raw_document(account, f"e{i}", f"user_{i % 7}", ["login", "page_view"][i % 2],
                     now - timedelta(minutes=1, seconds=i * 97 % (30 * 3600)), ingested_at)
        for i in range(count)
    ]  # fmt: skip


async def assert_exact(db: Any, sdb: Any, account: str, now: datetime) -> None:
    watermark = await rollup_store.read_watermark(db)
    for window in WINDOWS:
        body, _ = await compute(db, account, window, 100, now, watermark)
        truth = ground_truth(sdb["events"], account, parse_iso(body["from"]),
                             parse_iso(body["to"]), 100)  # fmt: skip
        assert figures(body) == truth, window


async def test_running_the_job_twice_changes_nothing(adb: Any, sdb: Any, settings: Settings):
    now = datetime.now(UTC)
    account = unique("idem")
    await seed(adb, spread_events(account, now, 600, now - timedelta(minutes=5)))
    first = await jobs.run_once(adb, settings, now=now)
    assert first is not None and first.minute_buckets > 0 and first.hour_buckets > 0
    before = snapshot(sdb)
    assert await jobs.run_once(adb, settings, now=now) is None  # watermark did not advance
    later = await jobs.run_once(adb, settings, now=now + timedelta(seconds=30))
    assert later is not None and later.minute_buckets == 0  # nothing new arrived
    assert snapshot(sdb) == before
    # a crash before the watermark was published: the redo writes the same documents
    sdb["rollup_state"].delete_many({})
    await jobs.run_once(adb, settings, now=now)
    assert snapshot(sdb) == before
    await assert_exact(adb, sdb, account, now)


async def test_late_events_land_in_their_own_minute(adb: Any, sdb: Any, settings: Settings):
    now = datetime.now(UTC)
    account = unique("late")
    await seed(adb, spread_events(account, now, 200, now - timedelta(minutes=5)))
    await jobs.run_once(adb, settings, now=now)
    late_ts = floor(now - timedelta(hours=20), "minute") + timedelta(seconds=7)
    late = [raw_document(account, f"late{i}", "late_user", "call_made", late_ts, now)
            for i in range(3)]  # fmt: skip
    await seed(adb, late)
    await jobs.run_once(adb, settings, now=now + timedelta(seconds=20))
    bucket = sdb["rollups_minute"].find_one(
        {"account_id": account, "start": floor(late_ts, "minute")}
    )
    assert bucket is not None
    assert {"t": "call_made", "n": 3} in bucket["types"]
    await assert_exact(adb, sdb, account, now + timedelta(seconds=21))


async def test_two_schedulers_at_once_stay_exact(adb: Any, sdb: Any, settings: Settings):
    now = datetime.now(UTC)
    account = unique("two")
    await seed(adb, spread_events(account, now, 500, now - timedelta(minutes=5)))
    await asyncio.gather(
        jobs.run_once(adb, settings, now=now),
        jobs.run_once(adb, settings, now=now + timedelta(seconds=3)),
        jobs.run_once(adb, settings, now=now + timedelta(seconds=1)),
    )
    await assert_exact(adb, sdb, account, now + timedelta(seconds=4))
    # and an older writer can never regress a bucket a newer run wrote
    newest = sdb["rollups_minute"].find_one({"account_id": account})
    assert newest is not None
    before = contents(sdb)
    stale = Counts()
    stale.add_event("login", "ghost", 99)
    await rollup_store.write_buckets(adb, "minute", account, [(newest["start"], stale)],
                                     newest["w"] - timedelta(seconds=1))  # fmt: skip
    assert contents(sdb) == before
    await assert_exact(adb, sdb, account, now + timedelta(seconds=4))


async def test_an_account_with_200k_users_in_one_hour(adb: Any, sdb: Any, settings: Settings):
    now = datetime.now(UTC)
    account = unique("wide")
    hour = floor(now - timedelta(hours=3), "hour")
    docs = [raw_document(account, f"e{i}", f"user_{i:06d}", "page_view",
                         hour + timedelta(milliseconds=i * 17), now - timedelta(minutes=1))
            for i in range(200_000)]  # fmt: skip
    await seed(adb, docs)
    await jobs.run_once(adb, settings, now=now)
    largest = max(
        len(bson.encode(d))
        for name in ("rollups_hour", "rollups_hour_users", "rollups_minute")
        for d in sdb[name].find({"account_id": account})
    )
    assert largest < 4 * 1024 * 1024, "bucket documents stay far from the 16 MiB limit"
    assert sdb["rollups_hour_users"].count_documents({"account_id": account}) >= 39
    for window in ("24h", "7d"):
        body, _ = await compute(
            adb, account, window, 5, now, await rollup_store.read_watermark(adb)
        )
        assert body["total"] == 200_000 and body["unique_users"] == 200_000, window
        assert body["top_users"][0] == {"user_id": "user_000000", "events": 1}


async def test_summary_cost_is_flat_in_the_number_of_events(
    adb: Any, settings: Settings, start_service: ServiceFactory
) -> None:
    now = datetime.now(UTC)
    account = unique("flat")
    ingested = now - timedelta(minutes=2)
    minutes = [floor(now, "minute") - timedelta(minutes=m) for m in range(1, 1441)]
    await seed(adb, [raw_document(account, f"a{i}", "u", "login", m, ingested)
                     for i, m in enumerate(minutes)])  # fmt: skip
    await jobs.run_once(adb, settings, now=now)
    service, _ = start_service(mongo_db=settings.mongo_db, run_rollups=False,
                               summary_cache_seconds=0)  # fmt: skip

    def reads() -> tuple[int, int, int]:
        r = httpx.get(f"{service.url}/summary/{account}", params={"window": "24h"})
        return (
            int(r.headers["x-buckets-read"]),
            int(r.headers["x-raw-events-read"]),
            r.json()["total"],
        )

    buckets_small, raw_small, total_small = reads()
    assert buckets_small <= 1440
    arrived = now + timedelta(seconds=5)  # after the first run's watermark
    await seed(adb, [raw_document(account, f"b{i}_{k}", f"u{k}", "login", m, arrived)
                     for i, m in enumerate(minutes) for k in range(9)])  # fmt: skip
    await jobs.run_once(adb, settings, now=now + timedelta(seconds=30))
    buckets_big, raw_big, total_big = reads()
    assert total_big > total_small * 5  # ten times the events...
    # ...the same bucket reads (give or take the minute the clock may cross meanwhile)
    assert buckets_big <= 1440 and abs(buckets_big - buckets_small) <= 1
    assert raw_big <= 10 and raw_small <= 10  # only the live edge is read raw


def run_backfill(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MONGO_URL": settings.mongo_url, "MONGO_DB": settings.mongo_db}
    return subprocess.run([sys.executable, "-m", "scripts.backfill_rollups", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


async def test_backfill_is_idempotent_repairs_and_resumes(adb: Any, sdb: Any, settings: Settings):
    now = datetime.now(UTC)
    account = unique("bf")
    await seed(adb, spread_events(account, now, 800, now - timedelta(minutes=5)))
    await jobs.run_once(adb, settings, now=now)
    good, good_contents = snapshot(sdb), contents(sdb)
    start, end = floor(now - timedelta(hours=31), "hour"), floor(now, "hour") + timedelta(hours=1)
    span = ["--from", start.isoformat(), "--to", end.isoformat(), "--account", account]

    again = run_backfill(settings, *span)
    assert again.returncode == 0, again.stderr
    assert "buckets written: 0" in again.stdout and "deleted: 0" in again.stdout
    assert snapshot(sdb) == good

    sdb["rollups_minute"].delete_many(
        {"account_id": account, "start": {"$lt": start + timedelta(hours=5)}}
    )
    sdb["rollups_hour"].update_one({"account_id": account}, {"$set": {"total": 12345}})
    damaged = snapshot(sdb)
    dry = run_backfill(settings, *span, "--dry-run")
    assert dry.returncode == 0 and "would write" in dry.stdout
    assert "would write: 0" not in dry.stdout
    assert snapshot(sdb) == damaged  # a dry run changes nothing
    assert contents(sdb) != good_contents

    # interrupted after 4 hours, then the same command finishes the job
    def interrupt(report: Report) -> None:
        if report.hours_done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await backfill(adb, settings, start, end, account=account, progress=interrupt)
    resumed = run_backfill(settings, *span)
    assert resumed.returncode == 0, resumed.stderr
    assert "(4 resumed past)" in resumed.stdout
    assert contents(sdb) == good_contents
    await assert_exact(adb, sdb, account, now)


def test_backfill_refuses_ranges_raw_retention_may_have_emptied(settings: Settings, sdb: Any):
    now = datetime.now(UTC)
    old = now - timedelta(days=10)
    sdb["rollups_hour"].insert_one({"_id": "keep|x", "key": "keep", "account_id": "acc",
                                    "start": old, "total": 5, "types": [], "users": [],
                                    "w": now, "rev": now})  # fmt: skip
    refused = run_backfill(settings, "--from", old.isoformat(),
                           "--to", now.isoformat())  # fmt: skip
    assert refused.returncode == 2
    assert "refusing to backfill" in refused.stderr and "earliest safe --from" in refused.stderr
    assert sdb["rollups_hour"].find_one({"_id": "keep|x"})["total"] == 5
    bad = run_backfill(settings, "--from", "yesterday", "--to", now.isoformat())
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr
