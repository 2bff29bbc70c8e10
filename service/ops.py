"""GET /health, /ready and /metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from sanic import HTTPResponse, Request

from service import metrics
from service.config import Settings
from service.queue import GROUP
from service.responses import json_response

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
    return json_response(body, 503, {"Retry-After": "1"})


async def _queue_figures(request: Request) -> dict[str, tuple[str, float]]:
    settings: Settings = request.app.ctx.settings
    redis = request.app.ctx.redis
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(settings.queue_depth_key)
            pipe.xlen(settings.stream_key)
            pipe.xlen(settings.dead_letter_key)
            pipe.xpending(settings.stream_key, GROUP)
            depth, entries, dead, pending = await asyncio.wait_for(
                pipe.execute(raise_on_error=False), PROBE_TIMEOUT
            )
    except Exception:
        return {"redis_up": ("Whether Redis answered this scrape", 0)}
    pending_count = pending.get("pending", 0) if isinstance(pending, dict) else 0
    return {
        "redis_up": ("Whether Redis answered this scrape", 1),
        "queue_depth_events": ("Accepted events not yet stored in MongoDB", int(depth or 0)),
        "queue_stream_entries": ("Batches in the ingest stream", entries),
        "queue_pending_entries": (
            "Batches read by the flusher, not yet acknowledged",
            pending_count,
        ),
        "dead_letter_entries": ("Batches parked in the dead-letter stream", dead),
    }


async def metrics_endpoint(request: Request) -> HTTPResponse:
    live: dict[str, Any] = await _queue_figures(request)
    for extra in request.app.ctx.live_metrics:
        live.update(await extra(request))
    return HTTPResponse(
        metrics.render(live), content_type="text/plain; version=0.0.4; charset=utf-8"
    )
