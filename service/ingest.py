"""POST /events: authenticate, validate the whole batch, enqueue it, answer.

202 is sent only after Redis has acknowledged the XADD; any refusal stores
nothing, because the batch is a single stream entry written last.
"""

from __future__ import annotations

from datetime import timedelta

from redis.exceptions import RedisError
from sanic import HTTPResponse, Request

from service import metrics
from service.config import Settings
from service.events import InvalidJSON, Limits, now_utc, validate_batch
from service.queue import QUEUE_FULL, RATE_LIMITED, Producer
from service.responses import error_response, json_response

JSON_TYPES = ("application/json",)


def limits_from(settings: Settings) -> Limits:
    return Limits(
        max_events=settings.max_batch_events,
        max_future=timedelta(seconds=settings.max_future_seconds),
        max_age=timedelta(days=settings.raw_retention_days),
        max_metadata_bytes=settings.max_metadata_bytes,
        max_metadata_depth=settings.max_metadata_depth,
    )


def api_key_of(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return str(key)
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return str(auth[7:].strip()) or None
    return None


def client_of(request: Request, key: str | None) -> str:
    """Who a rate limit counts against: the API key, else the peer address."""
    return key or request.remote_addr or request.ip or "anonymous"


def is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type", "")
    return content_type.split(";", 1)[0].strip().lower() in JSON_TYPES


def _reject(reason: str, events: int, response: HTTPResponse) -> HTTPResponse:
    metrics.REQUESTS_REJECTED.labels(reason).inc()
    if events:
        metrics.EVENTS_REJECTED.labels(reason).inc(events)
    return response


async def post_events(request: Request) -> HTTPResponse:
    settings: Settings = request.app.ctx.settings
    retry_after = {"Retry-After": str(settings.retry_after_seconds)}
    key = api_key_of(request)
    if settings.api_keys and (key is None or key not in settings.api_keys):
        return _reject(
            "unauthorized",
            0,
            error_response(
                401, "unauthorized", "send a valid API key in X-API-Key or Authorization: Bearer"
            ),
        )
    if not is_json(request):
        return _reject(
            "unsupported_media_type",
            0,
            error_response(
                415, "unsupported_media_type", "send the batch as Content-Type: application/json"
            ),
        )
    body = request.body
    if len(body) > settings.max_body_bytes:
        return _reject(
            "body_too_large",
            0,
            error_response(
                413, "body_too_large", f"the body may be at most {settings.max_body_bytes} bytes"
            ),
        )
    try:
        events, problems = validate_batch(body, request.app.ctx.limits, now_utc())
    except InvalidJSON as exc:
        return _reject(
            "invalid_json",
            0,
            error_response(400, "invalid_json", f"the body is not valid JSON: {exc}"),
        )
    if problems:
        return _reject(
            "validation_failed",
            len(events),
            json_response({"error": "validation_failed", "details": problems}, 400),
        )
    if settings.api_keys:
        denied = sorted(
            {e.account_id for e in events if not settings.api_key_allows(key, e.account_id)}
        )
        if denied:
            return _reject(
                "forbidden",
                len(events),
                error_response(
                    403,
                    "forbidden",
                    "this API key may not write to these accounts",
                    accounts=denied[:50],
                ),
            )
    producer: Producer = request.app.ctx.producer
    client_id = client_of(request, key) if settings.rate_limit_events_per_second else ""
    try:
        outcome = await producer.enqueue(body, len(events), client_id)
    except (RedisError, OSError):
        return _reject(
            "redis_unavailable",
            len(events),
            error_response(
                503, "unavailable", "the queue is unreachable; retry later", retry_after
            ),
        )
    if outcome == QUEUE_FULL:
        return _reject(
            "overloaded",
            len(events),
            error_response(503, "overloaded", "the ingest queue is full; retry later", retry_after),
        )
    if outcome == RATE_LIMITED:
        return _reject(
            "rate_limited",
            len(events),
            error_response(
                429,
                "rate_limited",
                f"more than {settings.rate_limit_events_per_second} events/s for this client",
                retry_after,
            ),
        )
    metrics.EVENTS_ACCEPTED.inc(len(events))
    return json_response({"status": "queued", "count": len(events)}, 202)
