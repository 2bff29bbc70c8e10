"""Connections to Redis, a single server or a Redis Cluster (MongoDB's live in ``core.store``).

Every multi-key command and script the service runs touches keys of one stream
partition only, which share a hash tag (``core/keys.py``), so the same code
runs on both. Keyless commands (TIME) are never pipelined: a cluster pipeline
refuses them.
"""

from __future__ import annotations

from typing import TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

Redis: TypeAlias = aioredis.Redis | RedisCluster

# what a Redis call may raise when a server (or a cluster node) is unreachable,
# restarting or failing over: callers answer 503 or retry
REDIS_ERRORS = (RedisError, RedisClusterException, OSError)


def connect_redis(url: str, cluster: bool = False) -> Redis:
    """A client whose commands fail within seconds when Redis is unreachable."""
    if cluster:
        return RedisCluster.from_url(
            url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10
        )
    return aioredis.Redis.from_url(
        url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10
    )
