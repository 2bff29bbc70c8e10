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
import re
import unicodedata
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
from sanic import HTTPResponse, Request, Sanic
from sanic_ext import openapi

from core.api_keys import ApiKey
from core.events import MAX_PROBLEMS, Problem, Timestamp, is_account_id, now_utc
from core.settings import Settings
from service.auth import authorize, known_key
from service.errors import (
    ApiError,
    BadRequest,
    BodyTooLarge,
    Forbidden,
    InvalidJSON,
    Unauthorized,
    UnsupportedMediaType,
    ValidationFailed,
    client_input,
)
from service.ingest import Batch, admit, checked
from service.responses import json_response

# The type rule (README, "Sending from Segment, RudderStack and PostHog SDKs"):
# NFKD-fold accents, lowercase, every run of characters outside [a-z0-9_.:-]
# becomes "_", leading/trailing "_" go, at most 64 characters, empty -> "custom".
FALLBACK_TYPE = "custom"
_NOT_TYPE = re.compile(r"[^a-z0-9_.:-]+")

# Segment message types and the fixed stored type of each but track (whose
# type comes from its event name)
SEGMENT_TYPES = {"track": "", "page": "page", "screen": "screen", "identify": "identify",
                 "group": "group", "alias": "alias"}  # fmt: skip
# posthog-js sends JSON as text/plain (sendBeacon), curl often sends no type
SDK_CONTENT_TYPES = ("application/json", "text/plain", "")

SEGMENT_PATHS = ("/v1/batch",)
# /batch/ and /i/v0/ai/batch/ are what posthog-python posts to; /capture/, /e/
# and /i/v0/e/ are PostHog's single-event capture paths (posthog-js, curl)
POSTHOG_PATHS = ("/batch/", "/i/v0/ai/batch/", "/capture/", "/e/", "/i/v0/e/")

WRITE_KEY_HELP = "no write key: send it as the HTTP Basic user name (or writeKey in the body)"
API_KEY_HELP = "no api_key: send the project key as api_key (or token) in the body"

_timestamp_type: Any = Timestamp


def type_from_name(name: str) -> str:
    """The stored ``type`` of an event name: ``Order Completed`` → ``order_completed``."""
    folded = "".join(
        c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c)
    ).lower()
    kind = _NOT_TYPE.sub("_", folded).strip("_")[:64].rstrip("_")
    return kind or FALLBACK_TYPE


def gunzip(data: bytes, limit: int) -> bytes:
    """Decompress a gzip body, giving up as soon as it would exceed ``limit`` bytes.

    Memory stays bounded by the limit whatever the compression ratio (zip bombs).
    """
    out = bytearray()
    rest = data
    while True:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(rest, limit + 1 - len(out))
        except zlib.error as exc:
            raise BadRequest(f"the body is not valid gzip ({exc})") from None
        if len(out) > limit:
            raise BodyTooLarge(f"the body may be at most {limit} bytes once decompressed")
        if not inflater.eof:
            raise BadRequest("the body is not valid gzip (it ends inside the compressed data)")
        # a gzip file may hold several members, and zero padding after them
        rest = inflater.unused_data.lstrip(b"\x00")
        if not rest:
            return bytes(out)


def body_of(request: Request, settings: Settings) -> bytes:
    """The request body as JSON bytes: content type and encoding checked, gzip undone."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type not in SDK_CONTENT_TYPES:
        raise UnsupportedMediaType("send the batch as JSON (Content-Type: application/json)")
    body = request.body
    limit = settings.max_body_bytes
    if len(body) > limit:
        raise BodyTooLarge(f"the body may be at most {limit} bytes")
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip"):
        return gunzip(body, limit)
    raise UnsupportedMediaType(
        f"Content-Encoding {encoding!r} is not supported; send gzip or no encoding"
    )


def json_object(body: bytes) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidJSON(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None
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


@dataclass
class Converted:
    """Canonical events, and per event the SDK's name of each canonical field."""

    events: list[dict[str, Any]] = field(default_factory=list)
    names: list[dict[str, str]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def add(self, event: dict[str, Any], names: dict[str, str]) -> None:
        self.events.append(event)
        self.names.append(names)

    def problem(self, index: int, name: str | None, message: str) -> None:
        self.problems.append(Problem(index, name, message))

    def renamed(self, problems: list[Problem]) -> list[Problem]:
        """The validator's problems in the SDK's field names."""
        out = []
        for p in problems:
            names = self.names[p.index] if p.index is not None else {}
            out.append(Problem(p.index, names.get(p.field or "", p.field), p.message))
        return out


def canonical(
    event_id: object, account: str, user: object, kind: str, ts: object, metadata: dict[str, Any]
) -> dict[str, Any]:
    event = {"event_id": event_id, "account_id": account, "user_id": user, "type": kind,
             "timestamp": ts}  # fmt: skip
    kept = {k: v for k, v in metadata.items() if v is not None and v != {}}
    if kept:
        event["metadata"] = kept
    return event


def _object(converted: Converted, index: int, msg: dict[str, Any], name: str) -> dict[str, Any]:
    value = msg.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        converted.problem(index, name, "must be a JSON object")
        return {}
    return value


def _required(converted: Converted, index: int, msg: dict[str, Any], name: str, why: str) -> Any:
    value = msg.get(name)
    if value is None or value == "":
        converted.problem(index, name, f"is required ({why})")
    return value


def segment_events(messages: list[Any], account: str, default_ts: str) -> Converted:
    """Segment/RudderStack messages as canonical events (README says what is kept)."""
    out = Converted()
    for index, msg in enumerate(messages):
        if not isinstance(msg, dict):
            out.problem(index, None, "each message must be a JSON object")
            continue
        kind = msg.get("type")
        if not isinstance(kind, str) or kind not in SEGMENT_TYPES:
            allowed = ", ".join(SEGMENT_TYPES)
            out.problem(index, "type", f"must be one of {allowed} (got {kind!r})")
            continue
        message_id = _required(out, index, msg, "messageId", "it is the dedupe key")
        user_name = "userId" if msg.get("userId") not in (None, "") else "anonymousId"
        user = msg.get(user_name)
        if user is None or user == "":
            out.problem(index, "userId", "userId or anonymousId is required")
        ts_name = next((n for n in ("timestamp", "originalTimestamp") if msg.get(n)), "")
        ts = msg[ts_name] if ts_name else default_ts
        names = {"event_id": "messageId", "user_id": user_name, "timestamp": ts_name or "sentAt",
                 "account_id": "writeKey"}  # fmt: skip
        if kind == "track":
            name = msg.get("event")
            if not isinstance(name, str) or not name:
                out.problem(index, "event", "a track message needs its event name (a string)")
                continue
            stored = type_from_name(name)
            names |= {"type": "event", "metadata": "properties"}
            metadata: dict[str, Any] = {
                "event": name,
                "properties": _object(out, index, msg, "properties"),
            }
        elif kind in ("page", "screen"):
            stored = SEGMENT_TYPES[kind]
            names["metadata"] = "properties"
            metadata = {"name": msg.get("name"), "category": msg.get("category"),
                        "properties": _object(out, index, msg, "properties")}  # fmt: skip
        elif kind == "alias":
            stored = "alias"
            names["metadata"] = "previousId"
            metadata = {"previous_id": msg.get("previousId")}
        else:  # identify, group
            stored = SEGMENT_TYPES[kind]
            names["metadata"] = "traits"
            traits = _object(out, index, msg, "traits")
            context = msg.get("context")
            if not traits and isinstance(context, dict):
                traits = _object(out, index, context, "traits")  # where RudderStack puts them
            metadata = {"group_id": msg.get("groupId"), "traits": traits}
        out.add(canonical(message_id, account, user, stored, ts, metadata), names)
    return out


def posthog_events(messages: list[Any], account: str, default_ts: str) -> Converted:
    """PostHog events as canonical events (README says what is kept)."""
    out = Converted()
    for index, msg in enumerate(messages):
        if not isinstance(msg, dict):
            out.problem(index, None, "each event must be a JSON object")
            continue
        name = msg.get("event")
        if not isinstance(name, str) or not name:
            out.problem(index, "event", "is required (a string: the event name)")
            continue
        uuid = _required(out, index, msg, "uuid", "it is the dedupe key")
        properties = _object(out, index, msg, "properties")
        user = msg.get("distinct_id")
        if user is None or user == "":
            user = properties.get("distinct_id")  # where posthog-js puts it
        if user is None or user == "":
            out.problem(index, "distinct_id", "is required")
        # PostHog's own properties ($lib, $current_url, …) cannot be stored under
        # "$" keys in MongoDB: they go to "posthog", without the "$"
        own = {k: v for k, v in properties.items() if not (k.startswith("$") and len(k) > 1)}
        reserved = {k[1:]: v for k, v in properties.items() if k.startswith("$") and len(k) > 1}
        metadata = {"event": name, "properties": own, "posthog": reserved,
                    "set": msg.get("$set"), "set_once": msg.get("$set_once")}  # fmt: skip
        ts = msg.get("timestamp") or default_ts
        names = {"event_id": "uuid", "user_id": "distinct_id", "type": "event",
                 "timestamp": "timestamp" if msg.get("timestamp") else "sent_at",
                 "metadata": "properties", "account_id": "api_key"}  # fmt: skip
        out.add(canonical(uuid, account, user, type_from_name(name), ts, metadata), names)
    return out


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


async def answer(
    request: Request,
    read: Callable[[Settings], tuple[ApiKey | None, Batch]],
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
    return json_response({**success, "count": len(batch.events)}, 200)


async def segment_batch(request: Request) -> HTTPResponse:
    """POST /v1/batch: ``{"batch": [...], "sentAt": …}``, write key as the Basic user."""

    def read(settings: Settings) -> tuple[ApiKey | None, Batch]:
        body = body_of(request, settings)
        with client_input("the body"):
            envelope = json_object(body)
            key, account = account_of(
                request, settings, basic_user(request) or envelope.get("writeKey"), WRITE_KEY_HELP
            )
            sent_at = sent_at_of(envelope, "sentAt")
            default_ts = default_timestamp(envelope, "sentAt", sent_at)
            converted = segment_events(messages_of(envelope, "batch"), account, default_ts)
        return key, validated(request, converted, sent_at)

    return await answer(request, read, "code", {"success": True})


async def posthog_capture(request: Request) -> HTTPResponse:
    """PostHog: ``{"api_key": …, "batch": [...], "sent_at": …}`` or one event at the top level."""

    def read(settings: Settings) -> tuple[ApiKey | None, Batch]:
        body = body_of(request, settings)
        with client_input("the body"):
            envelope = json_object(body)
            single = "batch" not in envelope
            messages = [envelope] if single else messages_of(envelope, "batch")
            write_key = envelope.get("api_key") or envelope.get("token")
            if not write_key and single and isinstance(envelope.get("properties"), dict):
                write_key = envelope["properties"].get("token")  # posthog-js puts it there
            key, account = account_of(request, settings, write_key, API_KEY_HELP)
            sent_at = sent_at_of(envelope, "sent_at")
            default_ts = default_timestamp(envelope, "sent_at", sent_at)
            converted = posthog_events(messages, account, default_ts)
        return key, validated(request, converted, sent_at)

    return await answer(request, read, "detail", {"status": 1})


def add_routes(app: Sanic[Any, Any]) -> None:
    segment = openapi.definition(
        summary="Segment/RudderStack-compatible batch (all-or-nothing)",
        description=(
            "Body {batch: [messages], sentAt}; the write key is the HTTP Basic user name. "
            "200 {success: true, count} once the batch is queued; refusals are JSON 4xx "
            "with code and message. See the README for what each message type keeps."
        ),
    )(segment_batch)
    for i, path in enumerate(SEGMENT_PATHS):
        app.add_route(segment, path, methods=["POST"], name=f"sdk_segment_{i}")
    posthog = openapi.definition(
        summary="PostHog-compatible batch and capture (all-or-nothing)",
        description=(
            "Body {api_key, batch: [events], sent_at} or one event {api_key, event, "
            "distinct_id, uuid, properties, timestamp}. 200 {status: 1, count} once the "
            "batch is queued; refusals are JSON 4xx with detail."
        ),
    )(posthog_capture)
    for i, path in enumerate(POSTHOG_PATHS):
        app.add_route(posthog, path, methods=["POST"], name=f"sdk_posthog_{i}")
