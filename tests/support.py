"""Helpers the tests share: direct access to the servers, events, polling."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pymongo
import redis

from core import keys
from core.settings import Settings, load_settings
from tests.harness import Service, service_env, unique, wait_for

__all__ = [
    "Backends",
    "Service",
    "drained",
    "ids",
    "iso",
    "make_event",
    "service_env",
    "unique",
    "wait_for",
]


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def make_event(
    account: str,
    n: int,
    *,
    user: str = "u1",
    type_: str = "page_view",
    ts: datetime | None = None,
    **extra: Any,
) -> dict[str, Any]:
    event = {
        "event_id": f"e{n}",
        "account_id": account,
        "user_id": user,
        "type": type_,
        "timestamp": iso(ts or datetime.now(UTC) - timedelta(seconds=1)),
    }
    event.update(extra)
    return event


@dataclass
class Backends:
    """Direct (synchronous) access to the servers a test's service uses."""

    redis_url: str
    mongo_url: str
    db_name: str
    stream: str
    partitions_count: int = 1
    cluster: bool = False
    rollup_partitions: int = 1

    def __post_init__(self) -> None:
        self.redis: Any = (redis.RedisCluster.from_url(self.redis_url) if self.cluster
                           else redis.Redis.from_url(self.redis_url))  # fmt: skip
        self.mongo: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            self.mongo_url, tz_aware=True, serverSelectionTimeoutMS=5000
        )
        self.settings: Settings = load_settings(
            {
                "REDIS_URL": self.redis_url,
                "MONGO_URL": self.mongo_url,
                "MONGO_DB": self.db_name,
                "STREAM_KEY": self.stream,
                "STREAM_PARTITIONS": str(self.partitions_count),
                "ROLLUP_PARTITIONS": str(self.rollup_partitions),
            }
        )
        self.partitions = keys.partitions(self.settings)

    @property
    def db(self) -> pymongo.database.Database[dict[str, Any]]:
        return self.mongo[self.db_name]

    @property
    def events(self) -> pymongo.collection.Collection[dict[str, Any]]:
        return self.db[keys.EVENTS]

    def stored(self, account: str) -> list[dict[str, Any]]:
        return list(self.events.find({"account_id": account}))

    def count(self, account: str) -> int:
        return self.events.count_documents({"account_id": account})

    def queue_depth(self) -> int:
        return sum(int(self.redis.get(p.depth) or 0) for p in self.partitions)

    def stream_entries(self) -> int:
        return sum(int(self.redis.xlen(p.stream)) for p in self.partitions)

    def dead_letters(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        out: list[Any] = []
        for p in self.partitions:
            out.extend(self.redis.xrange(p.dead) or [])
        return out

    def pending(self) -> int:
        total = 0
        for p in self.partitions:
            if self.redis.exists(p.stream):
                total += int(self.redis.xpending(p.stream, keys.GROUP)["pending"])
        return total

    def tail_events(self, account: str) -> int:
        from core.tail import parse_entries

        total = 0
        for p in self.partitions:
            reply: Any = self.redis.xrange(p.tail(account))
            total += sum(len(e.events.ts) for e in parse_entries(p.index, reply))
        return total

    def tail_entries(self, account: str) -> int:
        return sum(int(self.redis.xlen(p.tail(account))) for p in self.partitions)

    def close(self) -> None:
        self.redis.close()
        self.mongo.close()


def drained(backends: Backends, account: str, expected: int) -> Callable[[], bool]:
    """The queue is empty (nothing accepted is waiting) and ``expected`` events are stored."""
    return lambda: backends.queue_depth() == 0 and backends.count(account) == expected


def ids(docs: Iterable[dict[str, Any]]) -> list[str]:
    return sorted(d["event_id"] for d in docs)


async def minute_with_room(seconds: float) -> None:
    """Wait until at least ``seconds`` are left in the current minute: for checks that
    hold only within one minute (at the next, a rollover moves every window)."""
    await eventually(lambda: 60 - datetime.now(UTC).timestamp() % 60 >= seconds, 70, 0.1,
                     what=f"a minute with {seconds} s left")  # fmt: skip


async def eventually(
    check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Async polling until ``check()`` is truthy, or fail with its last value.

    A synchronous check runs in a thread: it must not stall the event loop the
    in-process app and workers run on.
    """
    import asyncio
    import inspect
    import time

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if inspect.iscoroutinefunction(check):
            last = await check()
        else:
            last = await asyncio.to_thread(check)
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: {last!r}")
