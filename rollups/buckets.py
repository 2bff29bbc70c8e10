"""Bucket maths: time flooring, window plans, and the rollup document format.

A bucket is the exact count of one account's events in one minute or hour:
the total, counts by type and counts by user. User ids and types may contain
"." and "$", which MongoDB/FerretDB refuse in field names, so both are stored
as arrays of small objects rather than as maps. Per-user counts beyond
``USERS_PER_DOC`` spill into chunk documents of their own, so no bucket ever
nears the 16 MiB document limit (200k users in an hour is ~9 MiB of ids).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

Resolution = Literal["minute", "hour"]
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
STEP: dict[Resolution, timedelta] = {"minute": MINUTE, "hour": HOUR}
USERS_PER_DOC = 5000

WINDOWS: dict[str, timedelta] = {
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
MINUTE_BUCKET_WINDOW_LIMIT = timedelta(hours=24)

Document = dict[str, Any]


def floor(ts: datetime, resolution: Resolution) -> datetime:
    ts = ts.astimezone(UTC)
    if resolution == "minute":
        return ts.replace(second=0, microsecond=0)
    return ts.replace(minute=0, second=0, microsecond=0)


def starts(start: datetime, end: datetime, resolution: Resolution) -> Iterator[datetime]:
    """Bucket starts in [start, end), both already on the resolution's boundary."""
    current = start
    while current < end:
        yield current
        current += STEP[resolution]


@dataclass
class Counts:
    total: int = 0
    types: Counter[str] = field(default_factory=Counter)
    users: Counter[str] = field(default_factory=Counter)

    def add_event(self, event_type: str, user_id: str, n: int = 1) -> None:
        self.total += n
        self.types[event_type] += n
        self.users[user_id] += n

    def merge(self, other: Counts) -> None:
        self.total += other.total
        self.types.update(other.types)
        self.users.update(other.users)

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, str]]) -> Counts:
        counts = cls()
        for event_type, user_id in pairs:
            counts.add_event(event_type, user_id)
        return counts


@dataclass(frozen=True)
class WindowPlan:
    """Which buckets and raw ranges answer a window exactly, ending at ``to``.

    ``hours`` and ``minutes`` are [start, end) ranges served from buckets;
    ``edge`` is the partial current minute, always read from raw events.
    """

    window: str
    start: datetime
    to: datetime
    hours: tuple[datetime, datetime]
    minutes: tuple[datetime, datetime]
    edge: tuple[datetime, datetime]


def plan_window(window: str, to: datetime) -> WindowPlan:
    length = WINDOWS[window]
    minute_now = floor(to, "minute")
    if length <= MINUTE_BUCKET_WINDOW_LIMIT:
        start = floor(to - length, "minute")
        hours = (start, start)
        minutes = (start, minute_now)
    else:
        start = floor(to - length, "hour")
        hour_now = floor(to, "hour")
        hours = (start, hour_now)
        minutes = (hour_now, minute_now)
    return WindowPlan(window, start, to, hours, minutes, (minute_now, to))


def bucket_key(account_id: str, start: datetime) -> str:
    return f"{account_id}|{start.strftime('%Y-%m-%dT%H:%M')}"


def to_documents(
    account_id: str, start: datetime, counts: Counts, watermark: datetime, rev: datetime
) -> tuple[Document, list[Document]]:
    """One version of a bucket, and its user-chunk documents (usually none).

    Versions are ordered by (``w``, ``rev``): the watermark the counts are exact
    for, then the time of writing.
    """
    key = bucket_key(account_id, start)
    version_id = f"{key}|{watermark.isoformat()}|{rev.isoformat()}"
    users = sorted(counts.users.items())
    chunks = [users[i : i + USERS_PER_DOC] for i in range(0, len(users), USERS_PER_DOC)] or [[]]
    bucket: Document = {
        "_id": version_id,
        "key": key,
        "account_id": account_id,
        "start": start,
        "total": counts.total,
        "types": [{"t": t, "n": n} for t, n in sorted(counts.types.items())],
        "users": [{"u": u, "n": n} for u, n in chunks[0]],
        "user_chunks": len(chunks) - 1,
        "unique_users": len(users),
        "w": watermark,
        "rev": rev,
    }
    extra = [
        {
            "_id": f"{version_id}|{i}",
            "version": version_id,
            "key": key,
            "account_id": account_id,
            "start": start,
            "w": watermark,
            "users": [{"u": u, "n": n} for u, n in chunk],
        }
        for i, chunk in enumerate(chunks[1:], start=1)
    ]
    return bucket, extra


def newest_versions(docs: Iterable[Document]) -> list[Document]:
    """The current version of each bucket among the documents read."""
    newest: dict[str, Document] = {}
    for doc in docs:
        seen = newest.get(doc["key"])
        if seen is None or (doc["w"], doc["rev"]) > (seen["w"], seen["rev"]):
            newest[doc["key"]] = doc
    return sorted(newest.values(), key=lambda d: d["start"])


def from_documents(bucket: Document, chunks: Iterable[Document] = ()) -> Counts:
    counts = Counts(total=int(bucket["total"]))
    counts.types.update({item["t"]: int(item["n"]) for item in bucket["types"]})
    for doc in (bucket, *chunks):
        counts.users.update({item["u"]: int(item["n"]) for item in doc["users"]})
    return counts


def top_users(users: Counter[str], top: int) -> list[dict[str, Any]]:
    """Most events first; ties broken by user id so answers are deterministic."""
    ranked = sorted(users.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [{"user_id": user, "events": n} for user, n in ranked]
