"""Putting every account back on the rollups schedule when Redis lost it.

The schedules (a Redis sorted set per rollup partition: when each account's next
bucket leaves one of its windows) is what moves an idle account's windows forward; an account left
off it answers with stale windows, and once retention deletes buckets its head
still names, its rollovers fail (docs/OPERATIONS.md, Backup and restore). Redis
lost (or replaced by an empty one), the schedules are gone with it: a marker kept
beside them tells. Then every account with a head is scheduled as due at once, in
its partition's schedule; the next pass over the partition rolls each, which
computes its real next minute again. The holder of partition 0 does it.
"""

from __future__ import annotations

import logging

from core import keys
from core.connections import Redis
from core.settings import Settings
from core.store import Database

log = logging.getLogger(__name__)

PAGE = 1000


async def reschedule_if_lost(db: Database, redis: Redis, settings: Settings) -> int:
    """How many accounts were put back (0 when the schedule was there)."""
    marker = keys.rollup_schedule_kept(settings)
    if await redis.exists(marker):
        return 0
    accounts: set[str] = set()
    pages: dict[str, dict[str, int]] = {}  # schedule -> account -> due (now)
    async for doc in db[keys.HEADS].find({}, {"_id": 0, "account_id": 1}):
        account = doc["account_id"]
        if account in accounts:
            continue  # a head's previous version, not deleted yet
        accounts.add(account)
        schedule = keys.rollup_schedule(settings, keys.rollup_partition_of(settings, account))
        page = pages.setdefault(schedule, {})
        page[account] = 0
        if len(page) >= PAGE:
            await redis.zadd(schedule, page)
            page.clear()
    for schedule, page in pages.items():
        if page:
            await redis.zadd(schedule, page)
    await redis.set(marker, 1)
    if accounts:
        log.warning("the rollups schedule was missing (Redis lost or replaced): %d accounts "
                    "put back on it, each rolled at the next pass", len(accounts))  # fmt: skip
    return len(accounts)
