"""Bucket maths: times, windows, and the counts every rollup document holds.

Times inside the rollups are integer epoch milliseconds (UTC): flooring and
comparing them costs nothing, unlike datetimes. A *minute* or an *hour* is the
epoch-ms of its start.

Counts (total, by type, by user) are stored packed in one compressed binary
field: types as a map, users as one sorted, newline-separated blob of ids with
the list of their counts beside it, plus the top 100 users precomputed. A
document with 5,000 users is then ~20 KB that FerretDB returns in ~1.5 ms and
Python unpacks in under 1 ms, where 5,000 sub-documents cost FerretDB ~25 µs
each (docs/PERFORMANCE.md). User ids cannot contain a newline (they are
printable), so the blob is unambiguous.
"""

from __future__ import annotations

import heapq
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec
from bson import Binary

Resolution = Literal["minute", "hour"]
SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
STEP: dict[Resolution, int] = {"minute": MINUTE, "hour": HOUR}

WINDOWS: dict[str, int] = {
    "15m": 15 * MINUTE,
    "1h": HOUR,
    "6h": 6 * HOUR,
    "24h": DAY,
    "7d": 7 * DAY,
    "30d": 30 * DAY,
}
# windows up to a day start on a minute, longer ones on an hour (minute
# buckets are kept only ~48h)
MINUTE_WINDOW_LIMIT = DAY
TOP_KEPT = 100  # the API's largest `top`

_msgpack = msgspec.msgpack.Encoder()


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MS = timedelta(milliseconds=1)


def ms(ts: datetime) -> int:
    """Epoch milliseconds of an aware datetime, rounded down (MongoDB keeps milliseconds)."""
    return (ts - EPOCH) // ONE_MS


def to_datetime(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC)


def floor(epoch_ms: int, resolution: Resolution) -> int:
    return epoch_ms - epoch_ms % STEP[resolution]


def window_start(window: str, minute: int) -> int:
    """Where ``window`` starts for a summary asked during ``minute``.

    The summary's ``from`` is ``to - window`` rounded down to the minute, or to
    the hour for windows longer than a day.
    """
    length = WINDOWS[window]
    if length <= MINUTE_WINDOW_LIMIT:
        return minute - length
    return floor(minute - length, "hour")


def leaving_resolution(window: str) -> Resolution:
    """The buckets a window sheds as it moves: minutes, or whole hours."""
    return "minute" if WINDOWS[window] <= MINUTE_WINDOW_LIMIT else "hour"


def starts(start: int, end: int, resolution: Resolution) -> Iterator[int]:
    """Bucket starts in [start, end), both on the resolution's boundary."""
    return iter(range(start, end, STEP[resolution]))


@dataclass
class Counts:
    """Exact figures of a set of events: total, per type, per user."""

    total: int = 0
    types: dict[str, int] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)

    def add_event(self, event_type: str, user_id: str) -> None:
        self.total += 1
        self.types[event_type] = self.types.get(event_type, 0) + 1
        self.users[user_id] = self.users.get(user_id, 0) + 1

    def remove_event(self, event_type: str, user_id: str) -> None:
        self.total -= 1
        _merge(self.types, {event_type: 1}, -1)
        _merge(self.users, {user_id: 1}, -1)

    def merge(self, other: Counts, sign: int = 1) -> None:
        """Add (or with ``sign=-1`` take away) another set's figures."""
        self.total += sign * other.total
        _merge(self.types, other.types, sign)
        _merge(self.users, other.users, sign)

    def copy(self) -> Counts:
        return Counts(self.total, dict(self.types), dict(self.users))

    def __bool__(self) -> bool:
        return self.total != 0


def _merge(into: dict[str, int], other: dict[str, int], sign: int) -> None:
    get = into.get
    for key, n in other.items():
        value = get(key, 0) + sign * n
        if value:
            into[key] = value
        else:
            del into[key]


def top_users(users: dict[str, int], top: int) -> list[tuple[str, int]]:
    """Most events first; ties broken by user id so answers are deterministic."""
    return heapq.nsmallest(top, users.items(), key=lambda item: (-item[1], item[0]))


class _Payload(msgspec.Struct, array_like=True, gc=False):
    types: dict[str, int]
    users: bytes  # sorted ids, newline-separated
    counts: list[int]
    top: list[tuple[str, int]]


_payload_decoder = msgspec.msgpack.Decoder(_Payload)


def pack(counts: Counts) -> dict[str, Any]:
    """The stored form of a set of counts (see the module docstring)."""
    if (
        counts.total < 0
        or any(n < 0 for n in counts.types.values())
        or any(n < 0 for n in counts.users.values())
    ):
        raise ValueError("a count went below zero: the rollups are inconsistent")
    names = sorted(counts.users)
    payload = _Payload(
        counts.types,
        "\n".join(names).encode(),
        [counts.users[n] for n in names],
        top_users(counts.users, TOP_KEPT),
    )
    # level 1: a third of the size for a millisecond; FerretDB's cost grows with it
    data = zlib.compress(_msgpack.encode(payload), 1)
    if len(data) > MAX_PACKED_BYTES:
        raise TooLarge(
            f"{len(names)} distinct users and {len(counts.types)} types pack to "
            f"{len(data) / 2**20:.1f} MiB, past what a MongoDB document holds"
        )
    return {"total": counts.total, "unique_users": len(names), "data": Binary(data)}


class TooLarge(ValueError):
    """Counts that would not fit one MongoDB document (16 MiB), on any store."""


# MongoDB's 16 MiB, less room for the document's other fields; FerretDB takes more,
# but the service behaves the same on both (docs/OPERATIONS.md: limits of one account)
MAX_PACKED_BYTES = 16 * 2**20 - 64 * 2**10


PACKED_FIELDS = ("total", "unique_users", "data")


@dataclass
class Packed:
    """Stored counts, unpacked only as far as a reader needs."""

    total: int
    types: dict[str, int]
    unique_users: int
    users_blob: bytes
    user_counts: list[int]
    top: list[tuple[str, int]]
    _index: dict[str, int] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, doc: dict[str, Any]) -> Packed:
        payload = _payload_decoder.decode(zlib.decompress(doc["data"]))
        return cls(
            total=int(doc["total"]),
            types=payload.types,
            unique_users=int(doc["unique_users"]),
            users_blob=payload.users,
            user_counts=payload.counts,
            top=[(u, n) for u, n in payload.top],
        )

    @classmethod
    def empty(cls) -> Packed:
        return cls(0, {}, 0, b"", [], [])

    def names(self) -> list[str]:
        return self.users_blob.decode().split("\n") if self.users_blob else []

    def users(self) -> dict[str, int]:
        return dict(zip(self.names(), self.user_counts, strict=True))

    def unpack(self) -> Counts:
        return Counts(self.total, dict(self.types), self.users())

    def index(self) -> dict[str, int]:
        """Every user's count, built once: a kept document is asked again and again."""
        if self._index is None:
            self._index = self.users()
        return self._index

    def size(self) -> int:
        """Roughly the bytes it holds in memory, once its index is built too."""
        return 2 * len(self.users_blob) + 160 * len(self.user_counts) + 64 * len(self.top) + 512
