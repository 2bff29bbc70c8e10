"""The SDKs' messages as canonical events (what the README's tables say is kept).

Segment's and RudderStack's messages (track, page, screen, identify, group,
alias) and PostHog's events become the events POST /events takes; each
keeps, per canonical field, the SDK's own name for it, so a refusal names the
field the SDK's user wrote. Keys the store cannot hold (``$`` first, ``.``
inside) in what SDKs and pages generate are renamed, not refused: ``$`` is
dropped and ``.`` becomes ``_`` (with ``_`` in front while the name is taken: keys
that need no renaming keep theirs).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from core.events import Problem

# The type rule (README, "Sending from Segment, RudderStack and PostHog SDKs"):
# NFKD-fold accents, lowercase, every run of characters outside [a-z0-9_.:-]
# becomes "_", leading/trailing "_" go, at most 64 characters, empty -> "custom".
FALLBACK_TYPE = "custom"
_NOT_TYPE = re.compile(r"[^a-z0-9_.:-]+")

# Segment message types and the fixed stored type of each but track (whose
# type comes from its event name)
SEGMENT_TYPES = {"track": "", "page": "page", "screen": "screen", "identify": "identify",
                 "group": "group", "alias": "alias"}  # fmt: skip


def type_from_name(name: str) -> str:
    """The stored ``type`` of an event name: ``Order Completed`` → ``order_completed``."""
    folded = "".join(
        c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c)
    ).lower()
    kind = _NOT_TYPE.sub("_", folded).strip("_")[:64].rstrip("_")
    return kind or FALLBACK_TYPE


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
    kept = {k: storable(v) for k, v in metadata.items() if v is not None and v != {}}
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


# deeper than the validator allows is refused there; this only stops the recursion
MAX_RENAME_DEPTH = 32


def storable(value: Any, depth: int = 0) -> Any:
    """``value`` with every object key the store can hold (see the module's docstring)."""
    if depth > MAX_RENAME_DEPTH:
        return value
    if isinstance(value, dict):
        if not any(isinstance(k, str) and _renamed(k) for k in value):
            return {k: storable(v, depth + 1) for k, v in value.items()}
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = key
            if isinstance(key, str) and _renamed(key):
                # keys that need no renaming keep their names; renamed ones go around them
                name = key.replace(".", "_").lstrip("$") or "_"
                while name in value or name in out:
                    name = "_" + name
            out[name] = storable(item, depth + 1)
        return out
    if isinstance(value, list):
        return [storable(item, depth + 1) for item in value]
    return value


def _renamed(key: str) -> bool:
    return key.startswith("$") or "." in key


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
