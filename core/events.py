"""The event schema, the one-pass batch validator used on the hot path, the stored form.

msgspec decodes and checks types, patterns, lengths and unknown fields in C;
what it cannot express (timestamp bounds, metadata size and depth) is checked
here afterwards, and only when the cheap pass already succeeded.

Client clock skew: a batch that says when it was sent (``sent_at``) is shifted
by ``received − sent_at`` only when that exceeds a threshold (:func:`clock_shift`),
so a wrong device clock is corrected while network transit time is not folded
into every timestamp (Segment, RudderStack and PostHog always shift). The bounds
are checked on the corrected timestamps; the client's own stays as
``original_timestamp``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec

# "$(?!\n)": a bare "$" also matches before a trailing newline in Python's re;
# the look-ahead closes that hole and still means the same in ECMA regexes.
ID_PATTERN = r"^[A-Za-z0-9_.:-]+$(?!\n)"
_ACCOUNT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$(?!\n)")
TYPE_PATTERN = r"^[a-z0-9_.:-]+$(?!\n)"
# printable: no C0/C1 control characters and no DEL
USER_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]+$(?!\n)"

# lengths are checked by msgspec in C while decoding; the charsets of a whole
# batch are checked afterwards, once per field over the concatenated values
# (_charsets_ok), since each charset rule holds per character: a per-value
# regex from msgspec cost ~85% of decoding (docs/PROFILE.md)
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
ShortText = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
# the same rules with their patterns: the documented schema, and the slow path
# that names every broken field once a batch failed
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=ID_PATTERN)]
AccountId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=ID_PATTERN)]
UserId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=USER_PATTERN)]
EventType = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=TYPE_PATTERN)]
_LOWER = b"abcdefghijklmnopqrstuvwxyz0123456789_.:-"
ID_BYTES = _LOWER + b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TYPE_BYTES = _LOWER
ASCII_CONTROL = bytes([*range(0x20), 0x7F])
CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f]")

MAX_PROBLEMS = 50

FIELD_RULES = {
    "event_id": "must be 1..128 characters of A-Z a-z 0-9 _ . : -",
    "account_id": "must be 1..64 characters of A-Z a-z 0-9 _ . : -",
    "user_id": "must be 1..128 printable characters (no control characters)",
    "type": "must be 1..64 characters of a-z 0-9 _ . : -",
}


# gc=False: an event holds only strings, a datetime and JSON metadata, so it can
# never be part of a reference cycle; untracked, 100 of them per request no
# longer drive the cyclic collector (~9% faster decoding, docs/PROFILE.md)
class Event(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    event_id: Text
    account_id: ShortText
    user_id: Text
    type: ShortText
    timestamp: Timestamp
    metadata: dict[str, Any] | None = None
    # the client's timestamp when ``timestamp`` was corrected for clock skew
    original_timestamp: Timestamp | None = None


class EventSchema(Event):
    """``Event`` with every rule spelled out, patterns included."""

    event_id: EventId
    account_id: AccountId
    user_id: UserId
    type: EventType


class Problem(msgspec.Struct):
    index: int | None
    field: str | None
    message: str


@dataclass(frozen=True)
class Limits:
    max_events: int
    max_future: timedelta
    max_age: timedelta
    max_metadata_bytes: int
    max_metadata_depth: int
    clock_skew_threshold: timedelta = timedelta(seconds=60)


class NotJSON(ValueError):
    """The body is not JSON at all (as opposed to JSON that breaks the schema)."""


class EventsEnvelope(msgspec.Struct, forbid_unknown_fields=True):
    """The optional object form of a POST /events body: the batch and when it was sent."""

    events: msgspec.Raw
    sent_at: Timestamp | None = None


_batch_decoder = msgspec.json.Decoder(list[Event])
_raw_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_event_decoder = msgspec.json.Decoder(EventSchema)
_envelope_decoder = msgspec.json.Decoder(EventsEnvelope)
_encoder = msgspec.json.Encoder()
_JSON_SPACE = b" \t\r\n"
_PATH = re.compile(r"at `\$(?:\[(\d+)\])?\.?([A-Za-z0-9_]+)?")


def is_account_id(text: str) -> bool:
    """The account id rule: 1..64 characters of A-Z a-z 0-9 _ . : -"""
    return _ACCOUNT_ID.match(text) is not None


def decode_events(body: bytes) -> list[Event]:
    """Decode an already validated batch (used by the flusher)."""
    return _batch_decoder.decode(body)


def encode_events(events: list[Event]) -> bytes:
    """A batch as the flusher decodes it (after a skew correction changed it)."""
    return _encoder.encode(events)


def unwrap_envelope(body: bytes) -> tuple[bytes, datetime | None, list[Problem]]:
    """The events array of a POST /events body, its ``sent_at``, or why it is refused.

    A body that is not an object is returned as it is: the plain array form.
    """
    first = body[:1]
    if first != b"{" and (first not in _JSON_SPACE or body.lstrip(_JSON_SPACE)[:1] != b"{"):
        return body, None, []
    try:
        envelope = _envelope_decoder.decode(body)
    except msgspec.ValidationError as exc:
        return b"", None, [_envelope_problem(str(exc))]
    except msgspec.DecodeError as exc:
        raise NotJSON(str(exc)) from None
    except RecursionError:
        return b"", None, [Problem(None, "events", "nested too deeply")]
    return bytes(envelope.events), envelope.sent_at, []


def _envelope_problem(message: str) -> Problem:
    match = _PATH.search(message)
    field = match.group(2) if match else None
    if field is None and message.startswith(("Object missing required", "Object contains unknown")):
        field = message.split("`")[1]
    return Problem(None, field, message.split(" - at `")[0])


def clock_shift(sent_at: datetime, received_at: datetime, threshold: timedelta) -> timedelta | None:
    """How far to move a batch's timestamps: ``received − sent_at`` beyond the threshold.

    Within it the difference is mostly network transit (or a retry's wait),
    which says nothing about the device clock, so nothing moves.
    """
    skew = received_at - sent_at
    return skew if abs(skew) > threshold else None


def validate_batch(
    body: bytes, limits: Limits, now: datetime, shift: timedelta | None = None
) -> tuple[list[Event], list[Problem]]:
    """Return the events, or the first problems found (nothing partial).

    With ``shift`` (see :func:`clock_shift`) every timestamp moves by it before
    the bounds are checked, the same for all so the batch keeps its order.
    """
    try:
        events = _batch_decoder.decode(body)
    except msgspec.ValidationError:
        return [], _schema_problems(body)
    except msgspec.DecodeError as exc:
        raise NotJSON(str(exc)) from None
    except RecursionError:
        # msgspec stops at the interpreter's recursion limit (~1000 levels) with
        # this exception, before it has built anything; far beyond any limit here
        return [], [Problem(None, "metadata", _too_deep(limits.max_metadata_depth))]
    if not _charsets_ok(events):
        return [], _schema_problems(body)
    if not events:
        return [], [Problem(None, None, "the batch is empty; send 1 or more events")]
    if len(events) > limits.max_events:
        msg = f"the batch has {len(events)} events; at most {limits.max_events} allowed"
        return [], [Problem(None, None, msg)]
    if shift is None:
        return events, _semantic_problems(events, limits, now)
    note = f" (after correcting the client clock by {_seconds(shift)})"
    for index, event in enumerate(events):
        if event.original_timestamp is None:
            event.original_timestamp = event.timestamp
        try:
            event.timestamp = event.timestamp + shift
        except OverflowError:
            return [], [Problem(index, "timestamp", f"out of range{note}")]
    return events, _semantic_problems(events, limits, now, note)


def _charsets_ok(events: list[Event]) -> bool:
    ids = "".join([e.event_id for e in events]) + "".join([e.account_id for e in events])
    types = "".join([e.type for e in events])
    users = "".join([e.user_id for e in events])
    return _only(ids, ID_BYTES) and _only(types, TYPE_BYTES) and _no_control(users)


def _only(text: str, allowed: bytes) -> bool:
    # bytes.translate deleting the allowed bytes is a C loop ~4x faster than a regex
    return text.isascii() and not text.encode().translate(None, allowed)


def _no_control(text: str) -> bool:
    if text.isascii():
        encoded = text.encode()
        return len(encoded.translate(None, ASCII_CONTROL)) == len(encoded)
    return CONTROL_CHAR.search(text) is None  # C1 controls live outside ASCII


def _schema_problems(body: bytes) -> list[Problem]:
    """Slow path: find each broken event, so the client sees them all at once."""
    try:
        items = _raw_list_decoder.decode(body)
    except msgspec.ValidationError:
        return [Problem(None, None, "the body must be a JSON array of event objects")]
    except msgspec.DecodeError as exc:
        raise NotJSON(str(exc)) from None
    except RecursionError:
        return [Problem(None, "metadata", "nested too deeply")]
    problems: list[Problem] = []
    for index, raw in enumerate(items):
        try:
            _event_decoder.decode(raw)
        except msgspec.ValidationError as exc:
            problems.append(_problem_from_error(index, str(exc)))
            if len(problems) >= MAX_PROBLEMS:
                break
        except RecursionError:
            problems.append(Problem(index, "metadata", "nested too deeply"))
            if len(problems) >= MAX_PROBLEMS:
                break
    # never an empty list: the caller must not mistake a refusal for success
    return problems or [Problem(None, None, "the batch does not match the event schema")]


def _problem_from_error(index: int, message: str) -> Problem:
    match = _PATH.search(message)
    field = match.group(2) if match else None
    if field is None and message.startswith(("Object missing required", "Object contains unknown")):
        field = message.split("`")[1]
    clean = message.split(" - at `")[0]
    if field in FIELD_RULES and ("regex" in clean or "length" in clean):
        clean = FIELD_RULES[field]
    return Problem(index, field, clean)


def _semantic_problems(
    events: list[Event], limits: Limits, now: datetime, note: str = ""
) -> list[Problem]:
    latest = now + limits.max_future
    oldest = now - limits.max_age
    stamps = [e.timestamp for e in events]
    in_range = oldest <= min(stamps) and max(stamps) <= latest
    with_metadata = [i for i, e in enumerate(events) if e.metadata is not None]
    if in_range and not with_metadata:
        return []  # the common case, without a Python loop per event
    problems: list[Problem] = []
    for index in range(len(events)) if not in_range else with_metadata:
        event = events[index]
        ts = event.timestamp
        if ts > latest:
            problems.append(
                Problem(
                    index,
                    "timestamp",
                    f"more than {_seconds(limits.max_future)} in the future{note}",
                )
            )
        elif ts < oldest:
            problems.append(
                Problem(
                    index,
                    "timestamp",
                    f"older than the retention of {limits.max_age.days} days{note}",
                )
            )
        if event.metadata is not None:
            problem = _metadata_problem(event.metadata, limits)
            if problem:
                problems.append(Problem(index, "metadata", problem))
        if len(problems) >= MAX_PROBLEMS:
            return problems[:MAX_PROBLEMS]
    return problems


def _seconds(delta: timedelta) -> str:
    return f"{int(delta.total_seconds())} s"


def _metadata_problem(metadata: dict[str, Any], limits: Limits) -> str | None:
    size = len(_encoder.encode(metadata))
    if size > limits.max_metadata_bytes:
        return f"encodes to {size} bytes; at most {limits.max_metadata_bytes} allowed"
    return _storable_problem(metadata, limits.max_metadata_depth)


INT64 = range(-(2**63), 2**63)


def _too_deep(max_depth: int) -> str:
    return f"nested more than {max_depth} levels deep"


def _storable_problem(metadata: dict[str, Any], max_depth: int) -> str | None:
    """Depth and the few things BSON/MongoDB cannot store, found in one walk.

    Iterative, so no nesting depth can exhaust the interpreter's stack.
    """
    pending: list[tuple[object, int]] = [(metadata, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict):
            if depth > max_depth:
                return _too_deep(max_depth)
            for key, item in value.items():
                if key.startswith("$") or "." in key or "\x00" in key:
                    return f"key {key!r} may not start with '$' or contain '.' or NUL"
                pending.append((item, depth + 1))
        elif isinstance(value, list):
            if depth > max_depth:
                return _too_deep(max_depth)
            for item in value:
                if isinstance(item, list):
                    # FerretDB v1 cannot store them; refusing keeps every backend alike
                    return "arrays directly inside arrays are not supported; wrap them in objects"
                pending.append((item, depth + 1))
        elif isinstance(value, int) and not isinstance(value, bool) and value not in INT64:
            return "integers must fit in 64 bits"
        elif isinstance(value, str) and "\x00" in value:
            # PostgreSQL (under FerretDB) cannot store NUL in JSON text: refusing it
            # everywhere keeps an accepted event storable on every backend
            return "strings may not contain the NUL character (U+0000)"
    return None


def to_document(event: Event, batch_id: str, ingested_at: datetime) -> dict[str, Any]:
    """The stored form: UTC times, the stream entry that stored it, the hour it falls in."""
    ts = event.timestamp.astimezone(UTC)
    doc: dict[str, Any] = {
        "_id": storage_id(event.account_id, event.event_id),
        "event_id": event.event_id,
        "account_id": event.account_id,
        "user_id": event.user_id,
        "type": event.type,
        "timestamp": ts,
        "hour": ts.replace(minute=0, second=0, microsecond=0),
        "batch": batch_id,
        "ingested_at": ingested_at,
    }
    if event.metadata is not None:
        doc["metadata"] = event.metadata
    if event.original_timestamp is not None:
        doc["original_timestamp"] = event.original_timestamp.astimezone(UTC)
    return doc


def storage_id(account_id: str, event_id: str) -> str:
    # "|" is outside both id alphabets, so the key is unambiguous.
    return f"{account_id}|{event_id}"


def batch_schema(max_events: int = 1000) -> dict[str, Any]:
    """JSON Schema of the POST /events body, self-contained for the OpenAPI document."""
    _, components = msgspec.json.schema_components([EventSchema])
    array = {
        "type": "array",
        "minItems": 1,
        "maxItems": max_events,
        "items": {**components["EventSchema"], "title": "Event"},
    }
    envelope = {
        "type": "object",
        "title": "Envelope",
        "description": "with sent_at, timestamps are corrected for client clock skew",
        "properties": {"sent_at": {"type": "string", "format": "date-time"}, "events": array},
        "required": ["events"],
        "additionalProperties": False,
    }
    return {"oneOf": [array, envelope]}


def now_utc() -> datetime:
    return datetime.now(UTC)
