"""GET /health, /ready and /metrics, with the operations figures read at scrape time (queue,
processes, rollup lag)."""

from __future__ import annotations

import asyncio

from sanic import HTTPResponse, Request

from core import keys, metrics
from core.connections import REDIS_ERRORS
from core.metrics import Live
from core.settings import Settings
from core.tail import redis_time_ms
from service.responses import json_response
from service.watchdog import role_of

PROBE_TIMEOUT = 2.0


async def health(request: Request) -> HTTPResponse:
    return json_response({"status": "ok"})


async def _redis_ok(request: Request) -> bool:
    try:
        return bool(await asyncio.wait_for(request.app.ctx.redis.ping(), PROBE_TIMEOUT))
    except Exception:
        return False


async def _mongo_ok(request: Request) -> bool:
    try:
        await asyncio.wait_for(request.app.ctx.mongo.admin.command("ping"), PROBE_TIMEOUT)
        return True
    except Exception:
        return False


async def ready(request: Request) -> HTTPResponse:
    redis_ok, mongo_ok = await asyncio.gather(_redis_ok(request), _mongo_ok(request))
    body = {
        "status": "ready" if redis_ok and mongo_ok else "unavailable",
        "redis": redis_ok,
        "mongodb": mongo_ok,
    }
    if redis_ok and mongo_ok:
        return json_response(body)
    retry = str(request.app.ctx.settings.retry_after_seconds)
    return json_response(body, 503, {"Retry-After": retry})


async def _queue_figures(request: Request) -> dict[str, Live]:
    settings: Settings = request.app.ctx.settings
    redis = request.app.ctx.redis
    parts = keys.partitions(settings)
    rollup_parts = range(settings.rollup_partitions)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for part in parts:
                pipe.get(part.depth)
                pipe.xlen(part.stream)
                pipe.xlen(part.dead)
                pipe.xpending(part.stream, keys.GROUP)
                for rollup_part in rollup_parts:
                    pipe.scard(keys.dirty_set(settings, part, rollup_part))
            replies = await asyncio.wait_for(pipe.execute(raise_on_error=False), PROBE_TIMEOUT)
    except Exception:
        return {"redis_up": Live("Whether Redis answered this scrape", 0)}
    depth: dict[str, float] = {}
    entries: dict[str, float] = {}
    dead: dict[str, float] = {}
    pending: dict[str, float] = {}
    dirty: dict[str, float] = {str(r): 0.0 for r in rollup_parts}  # by rollup partition
    each = 4 + len(rollup_parts)
    for i, part in enumerate(parts):
        d, n, dl, p, *dirt = replies[each * i : each * (i + 1)]
        label = str(part.index)
        depth[label] = _number(d)
        entries[label] = _number(n)
        dead[label] = _number(dl)
        pending[label] = float(p.get("pending", 0)) if isinstance(p, dict) else 0.0
        for rollup_part, count in zip(rollup_parts, dirt, strict=True):
            dirty[str(rollup_part)] += _number(count)
    return {
        "redis_up": Live("Whether Redis answered this scrape", 1),
        "queue_depth_events": Live("Accepted events not yet stored in MongoDB", depth, "partition"),
        "queue_stream_entries": Live("Batches in the ingest stream", entries, "partition"),
        "queue_pending_entries": Live(
            "Batches read by a flusher, not yet acknowledged", pending, "partition"
        ),
        "dead_letter_entries": Live("Batches parked in the dead-letter stream", dead, "partition"),
        "rollup_dirty_accounts": Live(
            "Accounts with stored events not yet rolled up, by rollup partition",
            dirty,
            "partition",
        ),
    }


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float, bytes, str)) and value else 0.0


def _process_figures(request: Request) -> dict[str, Live]:
    """Restarts per process, from the start counts Sanic keeps for every process."""
    try:
        states = dict(request.app.m.workers)
    except Exception:
        return {}
    restarts: dict[str, float] = {}
    for name, state in states.items():
        if isinstance(state, dict) and "starts" in state:
            role = role_of(name)
            restarts[role] = restarts.get(role, 0) + max(0, int(state["starts"]) - 1)
    return {
        "process_restarts": Live(
            "Dead processes restarted since start-up, by role", restarts, "process"
        )
    }


async def rollup_figures(request: Request) -> dict[str, Live]:
    settings: Settings = request.app.ctx.settings
    redis = request.app.ctx.redis
    rollup_parts = range(settings.rollup_partitions)
    try:  # TIME not pipelined: a cluster pipeline refuses it
        now_reply = await redis.time()
        async with redis.pipeline(transaction=False) as pipe:
            for rollup_part in rollup_parts:
                pipe.get(keys.rollup_progress(settings, rollup_part))
            minutes = await pipe.execute()
    except REDIS_ERRORS:
        return {}
    now = redis_time_ms(now_reply)
    lag = {str(p): (now - int(m)) / 1000 for p, m in zip(rollup_parts, minutes, strict=True) if m}
    if not lag:
        return {}
    return {
        "rollup_lag_seconds": Live(
            "Seconds since the minute the last complete rollover pass over the rollup "
            "partition rolled to (healthy: below 60 + ROLLUP_INTERVAL_SECONDS)",
            lag,
            "partition",
        )
    }


async def metrics_endpoint(request: Request) -> HTTPResponse:
    live: dict[str, Live] = await _queue_figures(request)
    live.update(_process_figures(request))
    for extra in request.app.ctx.live_metrics:
        live.update(await extra(request))
    return HTTPResponse(
        metrics.render(live), content_type="text/plain; version=0.0.4; charset=utf-8"
    )
