"""Rollup documents no head names are swept: a rollover SIGKILLed while it publishes leaves
a draft whose documents go (or stay, when its head made it), and an idle head's retired
documents go after their grace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from core import keys
from core.buckets import floor, ms
from core.rollup_docs import COLLECTIONS, Head, read_head
from rollups.rollover import Roller
from rollups.sweep import ORPHAN_AFTER, Sweep, named_by, schedule_retired
from scripts.stack import ROOT
from tests.conftest import AppFactory, Running
from tests.oracle import figures, ground_truth, parse_iso
from tests.support import drained, eventually, make_event, unique

ROLL_ONCE = """
import asyncio, sys
from core import store
from core.connections import connect_redis
from core.settings import load_settings
from rollups.rollover import Roller

async def main():
    s = load_settings()
    db = store.database(store.connect(s), s)
    await Roller(db, connect_redis(s.redis_url), s).roll(sys.argv[1], int(sys.argv[2]))

asyncio.run(main())
"""


def account_documents(running: Running, account: str) -> set[str]:
    found: set[str] = set()
    for name in COLLECTIONS.values():
        found |= {d["_id"] for d in running.backends.db[name].find({"account_id": account},
                                                                  {"_id": 1})}  # fmt: skip
    return found


async def current_head(running: Running, account: str) -> Head | None:
    """The newest head with its bucket index (the buckets it names live there)."""
    return await read_head(running.db, account, with_index=True)


async def spread_events(running: Running, account: str, minutes: int) -> None:
    now = datetime.now(UTC)
    events = [make_event(account, m, user=f"u{m % 7}", ts=now - timedelta(minutes=m + 2))
              for m in range(minutes)]  # fmt: skip
    assert (await running.post(events)).status_code == 202
    await eventually(drained(running.backends, account, minutes))


async def test_a_rollover_killed_while_publishing_leaves_nothing_after_the_sweep(
    app: AppFactory,
) -> None:
    running = await app()
    running.start_flusher()
    env = {**os.environ, "REDIS_URL": running.settings.redis_url,
           "MONGO_URL": running.settings.mongo_url, "MONGO_DB": running.settings.mongo_db,
           "STREAM_KEY": running.settings.stream_key}  # fmt: skip
    drafts = running.backends.db[keys.DRAFTS]
    caught: list[str] = []
    for attempt in range(12):  # until a kill lands between the draft's documents and its head
        account = unique(f"killed{attempt}")
        await spread_events(running, account, 90)
        minute = floor(ms(datetime.now(UTC)), "minute")
        roll = subprocess.Popen([sys.executable, "-c", ROLL_ONCE, account, str(minute)],
                                cwd=ROOT, env=env)  # fmt: skip
        deadline = time.monotonic() + 30
        while drafts.find_one({"accounts": account}) is None and roll.poll() is None:
            assert time.monotonic() < deadline, "the rollover never drafted"
        time.sleep(0.003 * attempt)  # later each time: into its documents' writes
        roll.send_signal(signal.SIGKILL)
        roll.wait()
        if drafts.find_one({"accounts": account}) is not None:
            caught.append(account)
            head = await current_head(running, account)
            if account_documents(running, account) - named_by(head):
                break  # documents no head names: orphans
    assert caught, "no SIGKILL landed mid-publish in 12 tries"
    left = {a: account_documents(running, a) - named_by(await current_head(running, a))
            for a in caught}  # fmt: skip
    assert any(left.values()), "no kill left an orphan behind"
    # the sweep, as the rollups process runs it once the drafts are old enough
    await Sweep(running.db, running.redis, running.settings).run(
        datetime.now(UTC) + ORPHAN_AFTER + timedelta(seconds=1)
    )
    assert sum(drafts.count_documents({"accounts": a}) for a in caught) == 0
    for account in caught:
        head = await current_head(running, account)
        assert account_documents(running, account) == named_by(head), account
        # and the account rolls on, exact
        await Roller(running.db, running.redis, running.settings).roll(
            account, floor(ms(datetime.now(UTC)), "minute")
        )
        got = (await running.client.get(f"/summary/{account}", params={"window": "6h"})).json()
        truth = ground_truth(running.backends.events, account, parse_iso(got["from"]),
                             parse_iso(got["to"]), 5)  # fmt: skip
        assert figures(got) == truth and got["total"] == 90
    print("orphans swept:", {a: len(docs) for a, docs in left.items()})


async def test_an_idle_heads_retired_documents_go_after_their_grace(app: AppFactory) -> None:
    running = await app()
    running.start_flusher()
    account = unique("idle")
    roller = Roller(running.db, running.redis, running.settings)
    await spread_events(running, account, 3)
    first = await roller.roll(account, floor(ms(datetime.now(UTC)), "minute"))
    assert first is not None
    more = [make_event(account, 100 + n, ts=datetime.now(UTC) - timedelta(minutes=3))
            for n in range(2)]  # fmt: skip
    assert (await running.post(more)).status_code == 202
    await eventually(drained(running.backends, account, 5))
    second = await roller.roll(account, floor(ms(datetime.now(UTC)), "minute") + 60_000)
    assert second is not None and second.head.retired, "the second rollover superseded some"
    await schedule_retired(running.redis, running.settings, second.head)
    superseded = {doc_id for _, doc_id in second.head.retired}
    assert superseded <= account_documents(running, account)
    retire: Any = running.backends.redis
    key = keys.rollup_retire(running.settings, 0)
    # not yet due: nothing happens
    await Sweep(running.db, running.redis, running.settings).run()
    assert superseded <= account_documents(running, account)
    retire.zadd(key, {account: 0})  # as if the grace had passed
    await Sweep(running.db, running.redis, running.settings).run()
    assert not superseded & account_documents(running, account)
    assert account_documents(running, account) == named_by(await current_head(running, account))
    assert retire.zscore(key, account) is None
    # and the head before it: only the current version is left
    assert {h["version"] for h in running.backends.db[keys.HEADS].find({"account_id": account})
            } == {second.head.version}  # fmt: skip
