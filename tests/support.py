"""Helpers the tests share: direct access to the servers, events, polling."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pymongo
import redis

from scripts.harness import Service, service_env, unique, wait_for

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

    def __post_init__(self) -> None:
        self.redis = redis.Redis.from_url(self.redis_url)
        self.mongo: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            self.mongo_url, tz_aware=True, serverSelectionTimeoutMS=5000
        )

    @property
    def events(self) -> pymongo.collection.Collection[dict[str, Any]]:
        return self.mongo[self.db_name]["events"]

    def stored(self, account: str) -> list[dict[str, Any]]:
        return list(self.events.find({"account_id": account}))

    def count(self, account: str) -> int:
        return self.events.count_documents({"account_id": account})

    def queue_depth(self) -> int:
        return int(self.redis.get(f"{self.stream}:depth") or 0)

    def close(self) -> None:
        self.redis.close()
        self.mongo.close()


def drained(backends: Backends, account: str, expected: int) -> Callable[[], bool]:
    return lambda: backends.count(account) == expected and backends.queue_depth() == 0


def ids(docs: Iterable[dict[str, Any]]) -> list[str]:
    return sorted(d["event_id"] for d in docs)
