"""Retention against the real store: whole expired hours and minutes go, nothing younger.

Also the TTL path a real MongoDB takes: a changed ``RAW_RETENTION_DAYS`` updates
the TTL index in place (``collMod``) instead of failing with
IndexOptionsConflict at every start. FerretDB has no TTL indexes, so that test
runs only where the server has them (``MONGO_URL`` pointing at a MongoDB).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo.errors import OperationFailure

from core import keys, store
from core.buckets import DAY, HOUR, MINUTE, floor, ms, to_datetime
from core.events import Event, to_document
from rollups.retention import STATE_ID, Retention
from rollups.scheduler import ensure_rollup_indexes
from tests.conftest import AppFactory, Running
from tests.support import unique


@pytest.fixture
async def running(app: AppFactory) -> Running:
    return await app()


def raw(account: str, n: int, ts: datetime) -> dict[str, Any]:
    event = Event(event_id=f"e{n}", account_id=account, user_id="u", type="login", timestamp=ts)
    return to_document(event, "test", datetime.now(UTC))


async def test_expired_hours_of_raw_events_and_buckets_are_deleted(running: Running) -> None:
    db = running.db
    settings = running.settings
    await store.ensure_event_indexes(db, settings)
    await ensure_rollup_indexes(db)
    now = ms(datetime.now(UTC))
    keep = settings.raw_retention_days * DAY
    account = unique("ret")
    # the first sweep starts at the cut-off: say the last sweep stopped 3 hours before it
    cutoff_hour = floor(now - keep, "hour")
    state = {
        "_id": STATE_ID,
        "events": cutoff_hour - 3 * HOUR,
        "minutes": floor(now - 48 * HOUR, "minute") - 5 * MINUTE,
        "hours": floor(now - 90 * DAY, "hour") - 2 * HOUR,
    }
    await db[keys.STATE].insert_one(state)
    expired = [raw(account, i, to_datetime(cutoff_hour - HOUR - i * MINUTE)) for i in range(30)]
    young = [raw(account, 100 + i, to_datetime(cutoff_hour + HOUR + i)) for i in range(5)]
    await store.insert_new(store.events(db), expired + young)
    old_minute = floor(now - 48 * HOUR, "minute") - 2 * MINUTE
    await db[keys.MINUTES].insert_many([
        {"_id": "old", "account_id": account, "start": to_datetime(old_minute)},
        {"_id": "new", "account_id": account, "start": to_datetime(floor(now, "minute"))},
    ])  # fmt: skip
    deleted = await Retention(db, settings, raw_by_delete=True).sweep(now)
    assert deleted["events"] == 30
    assert deleted["minutes"] == 1
    left = {d["event_id"] async for d in store.events(db).find({"account_id": account})}
    assert left == {f"e{100 + i}" for i in range(5)}
    assert {d["_id"] async for d in db[keys.MINUTES].find({"account_id": account})} == {"new"}
    # a second sweep finds nothing more: it goes on from where it stopped
    again = await Retention(db, settings, raw_by_delete=True).sweep(now)
    assert again == {"minutes": 0, "hours": 0, "events": 0}


async def test_a_changed_raw_retention_updates_the_ttl_index(running: Running) -> None:
    db = running.db
    if not await store.ensure_event_indexes(db, running.settings):
        pytest.skip("this server has no TTL indexes (FerretDB): set MONGO_URL to a MongoDB")
    longer = replace(running.settings, raw_retention_days=running.settings.raw_retention_days + 3)
    try:
        assert await store.ensure_event_indexes(db, longer)
    except OperationFailure as exc:  # the bug this guards against: IndexOptionsConflict
        pytest.fail(f"changing the retention failed: {exc}")
    info = await store.events(db).index_information()
    assert info[store.TTL_INDEX]["expireAfterSeconds"] == int(
        timedelta(days=longer.raw_retention_days).total_seconds()
    )


async def test_racing_upserts_of_a_missing_document_all_succeed(running: Running) -> None:
    """Concurrent upserts of one missing _id: FerretDB can answer E11000 to the losers
    (MongoDB retries those itself); store.retry_duplicate_key makes every one succeed.
    (FerretDB can also lose one of two concurrent updates of a document: the service
    never updates a document concurrently; rollup heads are insert-only versions.)"""
    db = running.db
    for round_ in range(5):
        doc_id = f"race-{round_}"

        async def upsert(n: int, key: str = doc_id) -> Any:
            return await store.retry_duplicate_key(
                lambda: db[keys.STATE].update_one({"_id": key}, {"$max": {"n": n}}, upsert=True)
            )

        await asyncio.gather(*(upsert(n) for n in range(20)))
        assert await db[keys.STATE].count_documents({"_id": doc_id}) == 1
