"""Putting every account back on the rollups schedule when Redis lost it.

The schedule (a Redis sorted set: when each account's next bucket leaves one of
its windows) is what moves an idle account's windows forward; an account left
off it answers with stale windows, and once retention deletes buckets its head
still names, its rollovers fail (docs/OPERATIONS.md, Backup and restore). Redis
lost (or replaced by an empty one), the schedule is gone with it: a marker kept
beside it tells. Then every account with a head is scheduled as due at once;
the next pass rolls each, which computes its real next minute again.
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
    schedule = keys.rollup_schedule(settings)
    accounts: set[str] = set()
    page: dict[str, int] = {}
    async for doc in db[keys.HEADS].find({}, {"_id": 0, "account_id": 1}):
        if doc["account_id"] in accounts:
            continue  # a head's previous version, not deleted yet
        accounts.add(doc["account_id"])
        page[doc["account_id"]] = 0  # due now
        if len(page) >= PAGE:
            await redis.zadd(schedule, page)
            page = {}
    if page:
        await redis.zadd(schedule, page)
    await redis.set(marker, 1)
    if accounts:
        log.warning("the rollups schedule was missing (Redis lost or replaced): %d accounts "
                    "put back on it, each rolled at the next pass", len(accounts))  # fmt: skip
    return len(accounts)
