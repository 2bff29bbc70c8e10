"""POST /events: authenticate, validate the whole batch, enqueue it, answer 202.

202 is sent only after Redis has acknowledged the XADD; any refusal stores
nothing, because the batch is a single stream entry written last.
"""

from __future__ import annotations

from datetime import timedelta

from redis.exceptions import RedisError
from sanic import HTTPResponse, Request

from core import metrics
from core.events import Event, Limits, NotJSON, now_utc, validate_batch
from core.settings import Settings
from service.auth import authenticate, authorize
from service.errors import (
    ApiError,
    BodyTooLarge,
    InvalidJSON,
    QueueFull,
    RateLimited,
    Unavailable,
    UnsupportedMediaType,
    ValidationFailed,
    client_input,
)
from service.queue import QUEUE_FULL, RATE_LIMITED, Producer
from service.responses import json_response

JSON_TYPES = ("application/json",)


def limits_from(settings: Settings) -> Limits:
    return Limits(
        max_events=settings.max_batch_events,
        max_future=timedelta(seconds=settings.max_future_seconds),
        max_age=timedelta(days=settings.raw_retention_days),
        max_metadata_bytes=settings.max_metadata_bytes,
        max_metadata_depth=settings.max_metadata_depth,
    )


def client_of(request: Request, key: str | None) -> str:
    """Who a rate limit counts against: the API key, else the peer address."""
    return key or request.remote_addr or request.ip or "anonymous"


def is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type", "")
    return content_type.split(";", 1)[0].strip().lower() in JSON_TYPES


def validated(request: Request, settings: Settings) -> list[Event]:
    """The request's events, all valid, or the reason none of them is taken."""
    if not is_json(request):
        raise UnsupportedMediaType("send the batch as Content-Type: application/json")
    body = request.body
    if len(body) > settings.max_body_bytes:
        raise BodyTooLarge(f"the body may be at most {settings.max_body_bytes} bytes")
    with client_input("the body"):
        try:
            events, problems = validate_batch(body, request.app.ctx.limits, now_utc())
        except NotJSON as exc:
            raise InvalidJSON(f"the body is not valid JSON: {exc}") from None
    if problems:
        raise ValidationFailed(problems)
    return events


async def enqueue(
    request: Request, settings: Settings, events: list[Event], key: str | None
) -> None:
    producer: Producer = request.app.ctx.producer
    client_id = client_of(request, key) if settings.rate_limit_events_per_second else ""
    retry = settings.retry_after_seconds
    try:
        outcome = await producer.enqueue(request.body, len(events), events[0].account_id,
                                         client_id)  # fmt: skip
    except (RedisError, OSError) as exc:
        # the XADD may or may not have been applied: a retry is safe (dedupe key)
        raise Unavailable(
            "the queue is unreachable; retry later (re-sending is safe)", retry
        ) from exc
    if outcome == QUEUE_FULL:
        raise QueueFull("the ingest queue is full; retry later", retry)
    if outcome == RATE_LIMITED:
        limit = settings.rate_limit_events_per_second
        raise RateLimited(f"more than {limit} events/s for this client", retry)


async def post_events(request: Request) -> HTTPResponse:
    settings: Settings = request.app.ctx.settings
    events: list[Event] = []
    try:
        key = authenticate(request, settings)
        events = validated(request, settings)
        authorize(settings, key, {e.account_id for e in events}, "write")
        await enqueue(request, settings, events, key)
    except ApiError as exc:
        metrics.REQUESTS_REJECTED.labels(exc.error).inc()
        if events:
            metrics.EVENTS_REJECTED.labels(exc.error).inc(len(events))
        raise
    metrics.EVENTS_ACCEPTED.inc(len(events))
    return json_response({"status": "queued", "count": len(events)}, 202)
