"""The routes existing analytics SDKs send to: Segment's batch API (also RudderStack's)
and PostHog's batch and capture APIs.

Each route only turns its SDK's envelope into the canonical event array; from
there on it is the POST /events pipeline (service/ingest.py: the same
validator, clock-skew correction, API-key rules, rate limit, queue bound and
Producer), so these routes add no second path to the store.

What the SDKs read from an answer (their Python sources, checked):

- Segment (``segment/analytics/request.py``, ``consumer.py``): any 2xx means
  stored; 4xx other than 408/410/429/460 is never retried; it logs the body's
  ``code`` and ``message``.
- RudderStack (``rudderstack/analytics/request.py``, ``consumer.py``): exactly
  200 means stored; 4xx other than 429 is never retried; it reads ``code`` and
  ``message`` (a JSON error body without ``code`` breaks its error handling).
- PostHog (``posthog/request.py``, ``consumer.py``): exactly 200 means stored;
  4xx other than 408/429 is never retried; it logs the body's ``detail``.

So success is a 200, every refusal a JSON 4xx naming its reason in those keys
too, and 429/503 (with ``Retry-After``) are the only answers worth a retry.
Nothing is dropped: a message that cannot become a valid event refuses its
whole batch, naming the message (``index``) and the SDK's own field.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec
from sanic import HTTPResponse, Request, Sanic
from sanic_ext import openapi

from core.api_keys import ApiKey
from core.events import MAX_PROBLEMS, Problem, Timestamp, is_account_id, now_utc
from core.settings import Settings
from service.auth import authorize, known_key
from service.cors import add_preflight, cors_headers
from service.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    InvalidJSON,
    Unauthorized,
    ValidationFailed,
    client_input,
)
from service.ingest import Batch, admit, checked
from service.responses import json_response
from service.sdk_bodies import body_of
from service.sdk_messages import SEGMENT_TYPES, Converted, posthog_events, segment_events

# batches: Segment's and RudderStack's server SDKs and RudderStack's batching, analytics.js
# batching (/v1/b), Segment's mobile import, RudderStack's sendBeacon (?writeKey=)
SEGMENT_BATCH_PATHS = ("/v1/batch", "/v1/b", "/v1/import", "/beacon/v1/batch")
# one message each: analytics.js's short routes, RudderStack's JS SDK's long ones
SEGMENT_SINGLE_PATHS = {
    **{f"/v1/{kind}": kind for kind in SEGMENT_TYPES},
    **{f"/v1/{kind[0]}": kind for kind in SEGMENT_TYPES},
}
# /batch/ and /i/v0/ai/batch/ are what posthog-python posts to; /capture/, /e/
# and /i/v0/e/ are PostHog's capture paths (posthog-js posts to /e/)
POSTHOG_PATHS = ("/batch/", "/i/v0/ai/batch/", "/capture/", "/e/", "/i/v0/e/")

WRITE_KEY_HELP = "no write key: send it as the HTTP Basic user name (or writeKey in the body)"
API_KEY_HELP = "no api_key: send the project key as api_key (or token) in the body"

_timestamp_type: Any = Timestamp


def json_value(body: bytes) -> dict[str, Any] | list[Any]:
    """A JSON object or array; anything else is a 400."""
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidJSON(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None
    if not isinstance(value, dict | list):
        raise ValidationFailed([Problem(None, None, "the body must be a JSON object")])
    return value


def json_object(body: bytes) -> dict[str, Any]:
    value = json_value(body)
    if not isinstance(value, dict):
        raise ValidationFailed([Problem(None, None, "the body must be a JSON object")])
    return value


def account_of(
    request: Request, settings: Settings, write_key: object, missing: str
) -> tuple[ApiKey | None, str]:
    """(API key, account) a write key stands for.

    With keys off the write key is the account id. With keys on it must be a
    known, active key that may write exactly one account: that account.
    """
    if not isinstance(write_key, str) or not write_key:
        raise Unauthorized(missing)
    if settings.keys_required:
        key = known_key(request, settings, write_key, missing)
        account = key.single_account
        if account is None:
            raise Forbidden("a write key must be an API key for exactly one account")
        authorize(key, [account], "write")
        return key, account
    if not is_account_id(write_key):
        raise Unauthorized(
            "the write key names the account: it must be 1..64 characters of A-Z a-z 0-9 _ . : -"
        )
    return None, write_key


def basic_user(request: Request) -> str | None:
    """The user name of ``Authorization: Basic …``, None without Basic credentials."""
    auth = request.headers.get("authorization", "")
    if not auth.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(auth[6:].strip(), validate=True).decode()
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise Unauthorized("the Authorization header holds no valid Basic credentials") from None
    return decoded.partition(":")[0]


def sent_at_of(envelope: dict[str, Any], name: str) -> datetime | None:
    raw = envelope.get(name)
    if raw is None:
        return None
    try:
        sent_at: datetime = msgspec.convert(raw, _timestamp_type)
    except msgspec.ValidationError:
        message = "must be an RFC 3339 time with a zone"
        raise ValidationFailed([Problem(None, name, message)]) from None
    return sent_at


def validated(request: Request, converted: Converted, sent_at: datetime | None) -> Batch:
    """The converted batch through the POST /events validator (and skew correction)."""
    if converted.problems:
        raise ValidationFailed(converted.problems[:MAX_PROBLEMS])
    try:
        return checked(request, msgspec.json.encode(converted.events), sent_at)
    except ValidationFailed as exc:
        raise ValidationFailed(converted.renamed(exc.fields["details"])) from None


def default_timestamp(envelope: dict[str, Any], sent_name: str, sent_at: datetime | None) -> Any:
    """For a message without a time: the batch's ``sent_at`` (the client's clock, so
    corrected like the others), else the time it was received."""
    return envelope[sent_name] if sent_at else now_utc().isoformat()


def messages_of(envelope: dict[str, Any], name: str) -> list[Any]:
    messages = envelope.get(name)
    if not isinstance(messages, list):
        raise ValidationFailed([Problem(None, name, "must be an array of messages")])
    return messages


def reason(exc: ApiError) -> str:
    """One line an SDK can log: the message and, for a refused batch, its first problem."""
    details = exc.fields.get("details")
    if not details:
        return exc.message
    first = details[0]
    where = f"batch[{first.index}]" if first.index is not None else ""
    if first.field:
        where += f".{first.field}" if where else first.field
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return f"{exc.message}: {where + ': ' if where else ''}{first.message}{more}"


Reader = Callable[[Settings], tuple[ApiKey | None, Batch]]


async def answer(
    request: Request,
    read: Reader,
    error_key: str,
    success: dict[str, Any],
) -> HTTPResponse:
    """Run the shared pipeline; a refusal's reason also goes where the SDK reads it.

    ``error_key`` is ``code`` (Segment, RudderStack: the error name beside
    ``message``) or ``detail`` (PostHog: the reason itself).
    """
    settings: Settings = request.app.ctx.settings
    try:
        batch = await admit(request, settings, lambda: read(settings))
    except ApiError as exc:
        exc.message = reason(exc)
        exc.fields[error_key] = exc.error if error_key == "code" else exc.message
        raise
    return json_response({**success, "count": len(batch.events)}, 200, cors_headers(request))


def segment_read(request: Request, batched: bool) -> Reader:
    """Segment's and RudderStack's bodies: ``{"batch": [...], "sentAt": …}``, or one message
    (``/v1/t``, ``/v1/track``, …); the write key as the Basic user name, ``writeKey`` in
    the body or (a beacon, which sends no headers) ``?writeKey=``."""

    def read(settings: Settings) -> tuple[ApiKey | None, Batch]:
        body = body_of(request, settings)
        with client_input("the body"):
            envelope = json_object(body)
            write_key = (basic_user(request) or envelope.get("writeKey")
                         or request.args.get("writeKey"))  # fmt: skip
            key, account = account_of(request, settings, write_key, WRITE_KEY_HELP)
            sent_at = sent_at_of(envelope, "sentAt")
            default_ts = default_timestamp(envelope, "sentAt", sent_at)
            if batched:
                messages = messages_of(envelope, "batch")
            else:
                implied = request.route and getattr(request.route.ctx, "message_type", None)
                messages = [envelope if "type" in envelope else {**envelope, "type": implied}]
            converted = segment_events(messages, account, default_ts)
        return key, validated(request, converted, sent_at)

    return read


async def segment_batch(request: Request) -> HTTPResponse:
    """POST /v1/batch, /v1/b, /v1/import, /beacon/v1/batch."""
    return await answer(request, segment_read(request, True), "code", {"success": True})


async def segment_single(request: Request) -> HTTPResponse:
    """POST /v1/t (/v1/track), /v1/p (/v1/page), …: one message."""
    return await answer(request, segment_read(request, False), "code", {"success": True})


async def posthog_capture(request: Request) -> HTTPResponse:
    """PostHog: ``{"api_key": …, "batch": [...], "sent_at": …}``, one event at the top level,
    or (older posthog-js) an array of events, in any body form posthog-js sends."""

    def read(settings: Settings) -> tuple[ApiKey | None, Batch]:
        body = body_of(request, settings, forms=True)
        with client_input("the body"):
            envelope = json_value(body)
            if isinstance(envelope, list):
                messages, envelope = envelope, {}
            elif "batch" in envelope:
                messages = messages_of(envelope, "batch")
            else:
                messages = [envelope]
            write_key = envelope.get("api_key") or envelope.get("token")
            first = messages[0] if messages and isinstance(messages[0], dict) else {}
            if not write_key and isinstance(first.get("properties"), dict):
                write_key = first["properties"].get("token")  # posthog-js puts it there
            key, account = account_of(request, settings, write_key, API_KEY_HELP)
            sent_at = sent_at_of(envelope, "sent_at")
            default_ts = default_timestamp(envelope, "sent_at", sent_at)
            converted = posthog_events(messages, account, default_ts)
        return key, validated(request, converted, sent_at)

    return await answer(request, read, "detail", {"status": 1})


SEGMENT_DOC = (
    "Body {batch: [messages], sentAt} (the batch routes) or one message (the others), as "
    "JSON, text/plain or gzip; the write key is the HTTP Basic user name (or writeKey in the "
    "body; ?writeKey= on the beacon route). 200 {success: true, count} once queued; refusals "
    "are JSON 4xx with code and message. See the README for what each message type keeps."
)
POSTHOG_DOC = (
    "Body {api_key, batch: [events], sent_at}, one event {api_key, event, distinct_id, uuid, "
    "properties, timestamp}, or an array of events; as JSON, text/plain, gzip (Content-"
    "Encoding, ?compression=gzip-js, or sniffed) or form-encoded data=<base64>. "
    "200 {status: 1, count} once queued; refusals are JSON 4xx with detail."
)


def add_routes(app: Sanic[Any, Any]) -> None:
    routes: list[tuple[str, Callable[..., Any], dict[str, Any]]] = [
        *((path, segment_batch, {}) for path in SEGMENT_BATCH_PATHS),
        *((path, segment_single, {"ctx_message_type": kind})
          for path, kind in SEGMENT_SINGLE_PATHS.items()),
        *((path, posthog_capture, {}) for path in POSTHOG_PATHS),
    ]  # fmt: skip
    documented = {
        segment_batch: openapi.definition(summary="Segment/RudderStack batch (all-or-nothing)",
                                          description=SEGMENT_DOC)(segment_batch),
        segment_single: openapi.definition(summary="Segment/RudderStack single message",
                                           description=SEGMENT_DOC)(segment_single),
        posthog_capture: openapi.definition(summary="PostHog batch and capture (all-or-nothing)",
                                            description=POSTHOG_DOC)(posthog_capture),
    }  # fmt: skip
    for i, (path, handler, ctx) in enumerate(routes):
        app.add_route(documented[handler], path, methods=["POST"], name=f"sdk_{i}",
                      ctx_cors="write", **ctx)  # fmt: skip
        add_preflight(app, path, "write", f"sdk_{i}_preflight")
