"""An account seen once does not keep state for ever: its tail stream goes when emptied,
its head's Redis copy lapses, a rollups process keeps a bounded number of heads, and
its figures stay exact, read from the store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from core.buckets import floor, ms
from rollups.rollover import Roller
from tests.conftest import AppFactory
from tests.oracle import figures, ground_truth, parse_iso
from tests.support import drained, eventually, make_event, unique

ACCOUNTS = 1500


def keys_like(running: Any, pattern: str) -> int:
    return sum(1 for _ in running.backends.redis.scan_iter(match=pattern, count=5000))


async def test_many_accounts_seen_once_leave_no_state_behind(app: AppFactory) -> None:
    running = await app(head_copy_ttl_seconds=2, rollup_heads_kept=100)
    running.start_flusher()
    tag = f"{{{running.settings.stream_key}:0}}"
    redis = running.backends.redis
    before = int(redis.info("memory")["used_memory"])
    prefix = unique("once")
    accounts = [f"{prefix}_{i}" for i in range(ACCOUNTS)]
    when = datetime.now(UTC) - timedelta(minutes=3)
    for i in range(0, ACCOUNTS, 100):
        batch = [make_event(a, 1, ts=when) for a in accounts[i : i + 100]]
        assert (await running.post(batch)).status_code == 202
    for account in accounts[::300]:
        await eventually(drained(running.backends, account, 1))
    await eventually(lambda: keys_like(running, f"{tag}:tail:{prefix}_*") == ACCOUNTS, 30,
                     what="every account's tail")  # fmt: skip
    peak = int(redis.info("memory")["used_memory"])
    roller = Roller(running.db, running.redis, running.settings)
    minute = floor(ms(datetime.now(UTC)), "minute")
    for account in accounts:
        await roller.roll(account, minute)
    # the tails were emptied into buckets: the streams themselves are gone
    assert keys_like(running, f"{tag}:tail:{prefix}_*") == 0
    assert not [a for a in redis.smembers(f"{tag}:dirty") if a.decode().startswith(prefix)]
    assert len(roller.heads) <= 100
    # the head copies lapse; summaries then read heads from the store, still exact
    await eventually(lambda: keys_like(running, f"{tag}:head:{prefix}_*") == 0, 10,
                     what="the head copies to lapse")  # fmt: skip
    for account in accounts[::250]:
        got = (await running.client.get(f"/summary/{account}", params={"window": "1h"})).json()
        truth = ground_truth(running.backends.events, account, parse_iso(got["from"]),
                             parse_iso(got["to"]), 5)  # fmt: skip
        assert figures(got) == truth and got["total"] == 1
    after = int(redis.info("memory")["used_memory"])
    print(f"Redis used_memory: before {before}, with {ACCOUNTS} accounts' tails {peak}, "
          f"after {after}")  # fmt: skip
    assert after - before < (peak - before) / 4, (before, peak, after)
