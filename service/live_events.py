"""Stored events, as they are stored, for whoever watches an account (GET /stream).

A worker serving ``/stream/{account}`` marks the account watched (a sorted set
in Redis, scored by when the mark lapses, renewed while a client stays). The
flusher reads the marks once a second and, after it retires a flush, publishes
the events it newly stored for watched accounts on each one's channel: one
PUBLISH per watched account and flush, none at all while nobody watches, and
fire-and-forget (a slow reader cannot hold a flush back).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import msgspec

from core import keys
from core.connections import Redis
from core.settings import Settings
from core.store import Document

WATCH_SECONDS = 30.0  # a mark lapses this long after its last renewal
RENEW_SECONDS = 10.0
POLL_SECONDS = 0.25  # a new watcher sees what is stored from then on (GET /stream waits it out)

_encode = msgspec.json.Encoder().encode


def public(doc: Document) -> dict[str, Any]:
    """What a watcher sees of a stored event: the fields POST /events takes."""
    out = {"event_id": doc.get("event_id"), "account_id": doc["account_id"],
           "user_id": doc["user_id"], "type": doc["type"],
           "timestamp": doc["timestamp"].isoformat().replace("+00:00", "Z")}  # fmt: skip
    if "metadata" in doc:
        out["metadata"] = doc["metadata"]
    return out


async def mark_watched(redis: Redis, settings: Settings, accounts: Iterable[str]) -> None:
    until = time.time() + WATCH_SECONDS
    mapping = dict.fromkeys(accounts, until)
    if mapping:
        key = keys.stream_watched(settings)
        await redis.zadd(key, mapping)
        await redis.zremrangebyscore(key, "-inf", time.time())


class Publisher:
    """The flusher's side: which accounts are watched (polled), and publishing to them."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._watched: frozenset[str] = frozenset()
        self._polled = 0.0
        # flushes run concurrently: one polls, the others wait for its answer (a
        # flush that used the old answer meanwhile would miss a new watcher)
        self._polling = asyncio.Lock()

    async def watched(self) -> frozenset[str]:
        async with self._polling:
            if time.monotonic() - self._polled >= POLL_SECONDS:
                found: list[bytes] = await self._redis.zrangebyscore(  # type: ignore[assignment]
                    keys.stream_watched(self._settings), time.time(), "+inf"
                )
                self._watched = frozenset(a.decode() for a in found)
                self._polled = time.monotonic()
        return self._watched

    async def publish(self, docs: Iterable[Document]) -> None:
        watched = await self.watched()
        if not watched:
            return
        per_account: dict[str, list[dict[str, Any]]] = {}
        for doc in docs:
            if doc["account_id"] in watched:
                per_account.setdefault(doc["account_id"], []).append(public(doc))
        for account, events in per_account.items():
            await self._redis.publish(keys.stream_channel(self._settings, account),
                                      _encode(events))  # fmt: skip
