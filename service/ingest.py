"""POST /events: authenticate, validate the whole batch, enqueue it, answer 202.

202 is sent only after Redis has acknowledged the XADD; any refusal stores
nothing, because the batch is a single stream entry written last. The SDK
routes (service/sdks.py) parse their own envelopes, then take the same path
through :func:`checked` and :func:`admit`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import msgspec
from sanic import HTTPResponse, Request

from core import metrics
from core.api_keys import ApiKey
from core.connections import REDIS_ERRORS
from core.events import (
    Event,
    Limits,
    NotJSON,
    clock_shift,
    encode_events,
    now_utc,
    unwrap_envelope,
    validate_batch,
)
from core.settings import Settings
from service.auth import authenticate, authorize
from service.cors import cors_headers
from service.errors import (
    ApiError,
    BodyTooLarge,
    InvalidJSON,
    QueueFull,
    Unavailable,
    UnsupportedMediaType,
    ValidationFailed,
    client_input,
)
from service.queue import QUEUE_FULL, QUEUED, Producer
from service.quotas import Quotas, refusal

JSON_TYPES = ("application/json",)
log = logging.getLogger(__name__)
_last_logged = 0.0


def log_unreachable(exc: BaseException) -> None:
    """Say why enqueues fail, at most every few seconds (an outage fails every request)."""
    global _last_logged
    if time.monotonic() - _last_logged >= 5:
        _last_logged = time.monotonic()
        log.warning("enqueue failed, answering 503: %s: %s", type(exc).__name__, exc)


@dataclass(frozen=True)
class Batch:
    """A validated batch: its events, and the JSON array the flusher will decode."""

    events: list[Event]
    body: bytes


@functools.cache
def queued_body(count: int) -> bytes:
    """The 202 body for a batch of ``count`` events, encoded once per count."""
    return msgspec.json.encode({"status": "queued", "count": count})


def limits_from(settings: Settings) -> Limits:
    return Limits(
        max_events=settings.max_batch_events,
        max_future=timedelta(seconds=settings.max_future_seconds),
        max_age=timedelta(days=settings.raw_retention_days),
        max_metadata_bytes=settings.max_metadata_bytes,
        max_metadata_depth=settings.max_metadata_depth,
        clock_skew_threshold=timedelta(seconds=settings.clock_skew_threshold_seconds),
    )


def client_of(request: Request, key: ApiKey | None) -> str:
    """Who a rate limit counts against: the API key (by id: a key never goes into a Redis
    key name), else the peer address."""
    if key is not None:
        return key.id
    return request.remote_addr or request.ip or "anonymous"


def is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type", "")
    return content_type.split(";", 1)[0].strip().lower() in JSON_TYPES


def validated(request: Request, settings: Settings) -> Batch:
    """The request's events, all valid, or the reason none of them is taken.

    The body is the plain array, or ``{"sent_at": …, "events": [...]}`` to have
    the timestamps corrected for the client's clock skew.
    """
    if not is_json(request):
        raise UnsupportedMediaType("send the batch as Content-Type: application/json")
    body = request.body
    if len(body) > settings.max_body_bytes:
        raise BodyTooLarge(f"the body may be at most {settings.max_body_bytes} bytes")
    with client_input("the body"):
        try:
            events_body, sent_at, problems = unwrap_envelope(body)
        except NotJSON as exc:
            raise InvalidJSON(f"the body is not valid JSON: {exc}") from None
    if problems:
        raise ValidationFailed(problems)
    return checked(request, events_body, sent_at)


def checked(request: Request, body: bytes, sent_at: datetime | None) -> Batch:
    """Validate a JSON array of events, corrected for clock skew when ``sent_at`` says so."""
    limits: Limits = request.app.ctx.limits
    now = now_utc()
    shift = clock_shift(sent_at, now, limits.clock_skew_threshold) if sent_at else None
    with client_input("the body"):
        try:
            events, problems = validate_batch(body, limits, now, shift)
        except NotJSON as exc:
            raise InvalidJSON(f"the body is not valid JSON: {exc}") from None
    if problems:
        raise ValidationFailed(problems)
    # the flusher stores what is enqueued: corrected timestamps must be in it
    return Batch(events, encode_events(events) if shift else body)


async def admit(
    request: Request, settings: Settings, read: Callable[[], tuple[ApiKey | None, Batch]]
) -> Batch:
    """``read`` authenticates and validates; then authorize, enqueue, count either outcome."""
    events: list[Event] = []
    try:
        key, batch = read()
        events = batch.events
        if key is not None:  # keys on (with keys off, anyone may write any account)
            authorize(key, {e.account_id for e in events}, "write")
        await enqueue(request, settings, batch, key)
    except ApiError as exc:
        metrics.REQUESTS_REJECTED.labels(exc.error).inc()
        if events:
            metrics.EVENTS_REJECTED.labels(exc.error).inc(len(events))
        raise
    metrics.EVENTS_ACCEPTED.inc(len(events))
    return batch


async def enqueue(request: Request, settings: Settings, batch: Batch, key: ApiKey | None) -> None:
    producer: Producer = request.app.ctx.producer
    quotas: Quotas = request.app.ctx.quotas
    events = batch.events
    part = producer.partition(events[0].account_id)
    client_id = client_of(request, key) if settings.rate_limit_events_per_second else ""
    limits = quotas.checks(part, key, client_id, events)
    try:
        outcome, which = await producer.enqueue(part, batch.body, len(events), limits)
    except REDIS_ERRORS as exc:
        log_unreachable(exc)
        # the XADD may or may not have been applied: a retry is safe (dedupe key)
        raise Unavailable(
            "the queue is unreachable; retry later (re-sending is safe)",
            settings.retry_after_seconds,
        ) from exc
    if outcome == QUEUED:
        if limits:
            quotas.admitted(limits)
        return
    if outcome == QUEUE_FULL:
        raise QueueFull("the ingest queue is full; retry later", settings.retry_after_seconds)
    raise refusal(limits[which - 1], settings.retry_after_seconds)


async def post_events(request: Request) -> HTTPResponse:
    settings: Settings = request.app.ctx.settings

    def read() -> tuple[ApiKey | None, Batch]:
        key = authenticate(request, settings)
        return key, validated(request, settings)

    batch = await admit(request, settings, read)
    return HTTPResponse(
        queued_body(len(batch.events)), 202, cors_headers(request), "application/json"
    )
