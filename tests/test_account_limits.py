"""The limits of one account (docs/OPERATIONS.md): an account whose rollup documents
would pass MongoDB's 16 MiB does not stop the rollups of any other, and its own
figures stay exact; types past the daily quota are refused at the door."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

from core import keys, tail
from core.buckets import floor, ms
from core.keys import partitions
from rollups.scheduler import RollupsProcess
from tests.conftest import AppFactory
from tests.oracle import figures, ground_truth, parse_iso
from tests.support import drained, eventually, make_event, unique

# 4x the 400k distinct users of one hour the issue found working; with 36-character
# ids their packed document is ~60 MiB, four times MongoDB's limit
USERS = 1_600_000
PER_ENTRY = 20_000


async def test_an_account_past_the_document_limit_stops_no_other_and_stays_exact(
    app: AppFactory,
) -> None:
    running = await app()
    running.start_flusher()
    huge, small = unique("huge"), unique("small")
    # the small account: through the service, stored, in its tail
    when = datetime.now(UTC) - timedelta(minutes=5)
    assert (
        await running.post([make_event(small, n, ts=when) for n in range(20)])
    ).status_code == 202
    await eventually(drained(running.backends, small, 20))
    # the huge one: its tail as the flusher writes it (1.6M events of distinct users,
    # in one hour), without a million raw events to write first
    part = partitions(running.settings)[0]
    rng = random.Random(5)
    base = ms(when) - 30 * 60_000
    redis = running.backends.redis
    for start in range(0, USERS, PER_ENTRY):
        events = tail.TailEvents(
            [base + (i % 3_600_000) for i in range(start, start + PER_ENTRY)],
            ["login" if i % 3 else "page_view" for i in range(start, start + PER_ENTRY)],
            [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(PER_ENTRY)],
        )  # fmt: skip
        redis.xadd(part.tail(huge), {"e": tail.encode(events)})
    redis.sadd(keys.account_dirty_set(running.settings, part, huge), huge)
    process = RollupsProcess(running.settings)
    try:
        await process.startup()
        minute = floor(ms(datetime.now(UTC)), "minute")
        rolled, failed = await process.roll_due(minute)
    finally:
        await process.close()
    assert (rolled, failed) == (1, 1)  # the small one rolled; the huge one failed alone
    assert redis.xlen(part.tail(huge)) == USERS // PER_ENTRY  # kept whole: nothing lost
    got = (await running.client.get(f"/summary/{huge}", params={"window": "6h"})).json()
    assert got["total"] == USERS and got["unique_users"] == USERS
    page_views = len(range(0, USERS, 3))
    assert got["totals"] == {"login": USERS - page_views, "page_view": page_views}
    small_got = (await running.client.get(f"/summary/{small}", params={"window": "1h"})).json()
    truth = ground_truth(running.backends.events, small, parse_iso(small_got["from"]),
                         parse_iso(small_got["to"]), 5)  # fmt: skip
    assert figures(small_got) == truth and small_got["total"] == 20
