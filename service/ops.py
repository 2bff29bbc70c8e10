"""GET /health, /ready and /metrics."""

from __future__ import annotations

import asyncio

from sanic import HTTPResponse, Request

from service import metrics
from service.config import Settings
from service.metrics import Live
from service.processes import role_of
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


async def _queue_figures(request: Request) -> dict[str, Live]:
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
        return {"redis_up": Live("Whether Redis answered this scrape", 0)}
    pending_count = pending.get("pending", 0) if isinstance(pending, dict) else 0
    return {
        "redis_up": Live("Whether Redis answered this scrape", 1),
        "queue_depth_events": Live("Accepted events not yet stored in MongoDB", int(depth or 0)),
        "queue_stream_entries": Live("Batches in the ingest stream", int(entries)),
        "queue_pending_entries": Live(
            "Batches read by the flusher, not yet acknowledged", pending_count
        ),
        "dead_letter_entries": Live("Batches parked in the dead-letter stream", int(dead)),
    }


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


async def metrics_endpoint(request: Request) -> HTTPResponse:
    live: dict[str, Live] = await _queue_figures(request)
    live.update(_process_figures(request))
    for extra in request.app.ctx.live_metrics:
        live.update(await extra(request))
    return HTTPResponse(
        metrics.render(live), content_type="text/plain; version=0.0.4; charset=utf-8"
    )
