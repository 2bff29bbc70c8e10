"""Connections to Redis (MongoDB's live in ``core.store``)."""

from __future__ import annotations

import redis.asyncio as aioredis


def connect_redis(url: str) -> aioredis.Redis:
    """A client whose commands fail within seconds when Redis is unreachable."""
    return aioredis.Redis.from_url(
        url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10
    )
