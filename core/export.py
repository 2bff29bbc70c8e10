"""An account's raw events as NDJSON: read hour by hour, in a resumable order.

Each line is one event with exactly the fields POST /events takes
(``event_id``, ``account_id``, ``user_id``, ``type``, ``timestamp`` in RFC 3339
UTC with milliseconds, ``metadata`` and ``original_timestamp`` when present),
so an export re-posted (in batches of at most 1,000) to a fresh service gives
the same summaries.

Reads are one query per hour, ``{"hour": h, "account_id": a}`` sorted by
``_id``: an equality on the indexed ``hour`` field, which both MongoDB and
FerretDB on PostgreSQL serve from an index (``core/store.py``), then read in
batches of ``EXPORT_BATCH_SIZE`` documents, so memory stays constant however
many events an export holds. The order is (hour, event_id), and the **cursor**
after an event is its hour and its id, ``2026-11-26T09:00:00Z~e-123``: an
export resumed from it gives exactly the events after that one. A client can
also make it from the last line it received (its timestamp's hour, its
``event_id``), when a stream breaks before its end.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from core import store
from core.events import storage_id
from core.settings import Settings
from core.store import Database, Document

HOUR = timedelta(hours=1)
FIELDS = {"_id": 0, "event_id": 1, "account_id": 1, "user_id": 1, "type": 1, "timestamp": 1,
          "metadata": 1, "original_timestamp": 1}  # fmt: skip
_CURSOR = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}):00:00Z~([A-Za-z0-9_.:-]{1,128})$")


def _plain(value: Any) -> Any:
    """BSON's own types msgspec does not know: ``Int64`` (an ``int`` subclass) and kin."""
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    raise NotImplementedError(f"cannot export a {type(value).__name__}")


_encode = msgspec.json.Encoder(enc_hook=_plain).encode


class ExportError(ValueError):
    """An export that cannot be asked for like this (bad range or cursor)."""


@dataclass(frozen=True)
class Cursor:
    """Where an export stands: after this event of this hour."""

    hour: datetime
    event_id: str

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%dT%H}:00:00Z~{self.event_id}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        match = _CURSOR.match(text)
        if not match:
            raise ExportError(
                f"{text[:200]!r} is not an export cursor: they look like "
                "2026-11-26T09:00:00Z~e-123 (the hour of an event's timestamp, ~, its event_id)"
            )
        try:
            hour = datetime.strptime(match[1], "%Y-%m-%dT%H").replace(tzinfo=UTC)
        except ValueError:
            raise ExportError(f"the cursor's hour {match[1]!r} is not a valid time") from None
        return cls(hour, match[2])

    @classmethod
    def after(cls, event: dict[str, Any]) -> Cursor:
        """The cursor after an exported line (as decoded JSON)."""
        ts = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).astimezone(UTC)
        return cls(floor_hour(ts), event["event_id"])


def floor_hour(ts: datetime) -> datetime:
    return ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def rfc3339(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_range(start: datetime, end: datetime, after: Cursor | None) -> None:
    if start.tzinfo is None or end.tzinfo is None:
        raise ExportError("from and to need a time zone (RFC 3339, e.g. 2026-11-26T09:00:00Z)")
    if end <= start:
        raise ExportError("to must be later than from")
    if after is not None and not floor_hour(start) <= after.hour < end:
        raise ExportError("the cursor is outside [from, to): resume with the same from and to")


def line(doc: Document) -> bytes:
    """One stored event as a line of the export: the fields POST /events takes."""
    event: dict[str, Any] = {
        "event_id": doc["event_id"],
        "account_id": doc["account_id"],
        "user_id": doc["user_id"],
        "type": doc["type"],
        "timestamp": rfc3339(doc["timestamp"]),
    }
    if doc.get("metadata") is not None:
        event["metadata"] = doc["metadata"]
    if doc.get("original_timestamp") is not None:
        event["original_timestamp"] = rfc3339(doc["original_timestamp"])
    return _encode(event) + b"\n"


def stored_span(settings: Settings, now: datetime) -> tuple[datetime, datetime]:
    """The hours where stored events can be: none is older than the raw retention (a day
    of margin for retention's own lag), none later than the future bound (an hour more)."""
    oldest = now - timedelta(days=settings.raw_retention_days + 1)
    newest = now + timedelta(seconds=settings.max_future_seconds) + HOUR
    return floor_hour(oldest), newest


async def events(
    db: Database,
    settings: Settings,
    account: str,
    start: datetime,
    end: datetime,
    after: Cursor | None = None,
) -> AsyncGenerator[tuple[bytes, Cursor], None]:
    """Each event of ``account`` with a timestamp in [start, end) after ``after``, as its
    NDJSON line and the cursor after it; in (hour, event_id) order.

    Only the hours where events can be stored are read (``stored_span``), so a range
    of years costs what a week does."""
    check_range(start, end, after)
    oldest, newest = stored_span(settings, datetime.now(UTC))
    hour = max(after.hour if after else floor_hour(start), oldest)
    last = min(end, newest)
    coll = store.events(db)
    while hour < last:
        query: dict[str, Any] = {"hour": hour, "account_id": account}
        if hour < start or hour + HOUR > end:  # a partial hour at either end
            query["timestamp"] = {"$gte": start, "$lt": end}
        if after is not None and after.hour == hour:
            query["_id"] = {"$gt": storage_id(account, after.event_id)}
        # MongoDB sorts one account-hour in memory (no index has both): allowDiskUse lets
        # an hour past its 100 MB sort limit go on disk; FerretDB accepts and ignores it
        found = coll.find(query, FIELDS, sort=[("_id", 1)],
                          batch_size=settings.export_batch_size, allow_disk_use=True)  # fmt: skip
        try:
            async for doc in found:
                yield line(doc), Cursor(hour, doc["event_id"])
        finally:
            await found.close()
        hour += HOUR
