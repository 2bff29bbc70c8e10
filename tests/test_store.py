"""Raw-event housekeeping against the real server: what is pruned and what is kept."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from scripts.stack import Stack
from service import store
from service.config import load_settings
from service.store import Document
from tests.rollup_support import raw_document
from tests.support import unique

Db = AsyncDatabase[Document]


def docs_aged(now: datetime, ages: list[timedelta]) -> list[dict[str, object]]:
    return [raw_document("acc", f"e{i}", "u", "login", now - age, now - age)
            for i, age in enumerate(ages)]  # fmt: skip


@pytest.fixture
async def db(stack: Stack) -> AsyncIterator[Db]:
    """A database of its own on the real server, dropped afterwards."""
    settings = load_settings({"MONGO_URL": stack.mongo_url, "MONGO_DB": unique("store")})
    client = store.connect(settings)
    yield store.database(client, settings)
    await client.drop_database(settings.mongo_db)
    await client.close()


async def test_prune_recent_keeps_only_the_last_15_minutes(db: Db) -> None:
    now = datetime.now(UTC)
    ages = [timedelta(minutes=m) for m in (1, 14, 16, 60)]
    await store.insert_events(store.recent(db), docs_aged(now, ages))
    assert await store.prune_recent(db, now) == 2
    left = sorted([d["event_id"] async for d in store.recent(db).find({})])
    assert left == ["e0", "e1"]


async def test_retention_deletes_only_events_older_than_the_cutoff(db: Db) -> None:
    now = datetime.now(UTC)
    ages = [timedelta(days=d) for d in (1, 6.9, 7.1, 30)]
    await store.insert_events(store.events(db), docs_aged(now, ages))
    assert await store.delete_expired_events(store.events(db), now - timedelta(days=7)) == 2
    assert await store.events(db).count_documents({}) == 2


async def test_recent_copy_marker_keeps_the_first_start(db: Db) -> None:
    first = datetime(2026, 1, 1, tzinfo=UTC)
    assert await store.recent_copy_since(db) is None
    await store.mark_recent_copy(db, True, first)
    await store.mark_recent_copy(db, True, first + timedelta(hours=1))
    assert await store.recent_copy_since(db) == first
    await store.mark_recent_copy(db, False, first)
    assert await store.recent_copy_since(db) is None
    now = first + timedelta(minutes=5)
    assert not store.recent_covers(first + timedelta(minutes=1), now, None)
    assert store.recent_covers(first + timedelta(minutes=1), now, first)
    assert not store.recent_covers(first - timedelta(seconds=1), now, first)
    assert not store.recent_covers(now - timedelta(minutes=15), now, first - timedelta(days=1))
