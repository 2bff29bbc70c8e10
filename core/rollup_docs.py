"""The rollup documents: per-account heads, window aggregates and buckets.

Per account there is one current **head** (``rollup_heads``): the minute ``S``
its aggregates end at, which tail entries they include (the last applied id per
stream partition), and the ids of the documents that hold its figures:

- the **window aggregates** (``rollup_windows``): the exact counts of
  ``[window_start(w, S), S)`` for each window, so a summary reads one of them, not
  hundreds of buckets. While an account's windows are small (``WINDOW_SET_ENTRIES``)
  all six are one **window set** document (a head names ``<set id>#<window>``): one
  row a rollover instead of six, which is most of what the store spends on rollups;
  larger ones each have a document of their own (one 16 MiB document each);
- its non-empty **minute** and **hour buckets** (``rollup_minutes``,
  ``rollup_hours``), which the rollup job subtracts as windows move on, and
  which time series read.

Nothing is ever updated in place: FerretDB has no atomic update of a document
(two concurrent updates of one document can lose one), and insert-only makes
readers safe anyway. A rollover inserts new documents under ids tagged by the
rollover (two racing jobs never write the same id), then inserts the head
``account|version+1``: only one of two racing rollovers can (the unique
``_id``), which is the compare-and-set. Readers take the highest version, then
the documents it names: one consistent state, whatever a rollup job is doing
meanwhile; a job that lost the race (or crashed half-way) leaves nothing a
reader can see. Superseded documents are deleted one rollover later, so a
reader holding the previous head still finds them.

Once a head is stored, the rollup job also keeps a **copy** of it in Redis
(``Head.copy``, next to the account's tail) before it trims the tail, only
ever replacing an older version. A summary reads that copy in the same
atomic call as the tail: one round trip instead of a store query per
summary, and a head never older than the tail it goes with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from bson import Binary
from cachetools import LRUCache

from core import keys
from core.buckets import PACKED_FIELDS, Counts, Packed, Resolution, to_datetime
from core.store import Database, Document
from core.tail import StreamId, format_id, parse_id

Kind = Literal["minute", "hour", "window", "index"]
COLLECTIONS: dict[Kind, str] = {
    "minute": keys.MINUTES,
    "hour": keys.HOURS,
    "window": keys.WINDOWS,
    "index": keys.INDEXES,
}

# the windows of an account whose six windows hold at most this many users and types
# in all are written as one document (a window set); past it, one document each
WINDOW_SET_ENTRIES = 20_000
WINDOW_SET = "all"  # in a window set's id where a window's name is in the others'

_encode = msgspec.msgpack.Encoder().encode
_refs = msgspec.msgpack.Decoder(list[tuple[int, str]])
_series_decoder = msgspec.msgpack.Decoder(dict[int, tuple[int, dict[str, int]]])


def bucket_id(account_id: str, resolution: Resolution, start: int, tag: str) -> str:
    return f"{account_id}|{resolution[0]}|{start}|{tag}"


def window_id(account_id: str, window: str, minute: int, tag: str) -> str:
    return f"{account_id}|w|{window}|{minute}|{tag}"


def window_set_id(account_id: str, minute: int, tag: str) -> str:
    """The id of one document holding all of an account's windows (``WINDOW_SET``)."""
    return f"{account_id}|w|{WINDOW_SET}|{minute}|{tag}"


def window_ref(set_id: str, window: str) -> str:
    """How a head names one window of a window set: ``<set id>#<window>``."""
    return f"{set_id}#{window}"


def document_of(ref: str) -> str:
    """The id of the document a head's window reference is in (ids hold no ``#``)."""
    return ref.partition("#")[0]


def index_id(account_id: str, tag: str) -> str:
    return f"{account_id}|i|{tag}"


@dataclass
class Head:
    account_id: str
    version: int = 0  # 0: not stored yet
    minute: int | None = None  # S: the aggregates cover up to here (exclusive)
    applied: dict[int, StreamId] = field(default_factory=dict)  # per partition
    windows: dict[str, str] = field(default_factory=dict)  # window -> aggregate id
    # non-empty buckets: start -> the tag of the rollover that wrote the current version;
    # kept in a separate immutable index document (``index``), read only when needed
    minutes: dict[int, str] = field(default_factory=dict)
    hours: dict[int, str] = field(default_factory=dict)
    index: str | None = None
    retired: list[tuple[Kind, str]] = field(default_factory=list)  # superseded by this head
    # erasures applied to this account so far (readers' running counts of the tail
    # start afresh when it moves: ``service/tail_counts.py``), and the run id of the
    # last one, so an erasure resumed after a crash knows its corrections are in
    erased: int = 0
    erasure: str = ""
    # the fencing token of the rollup partition's lease it was written under: a head
    # goes in only after one written under a token no newer (rollups/lease.py)
    fence: int = 0
    # retiring (rollups/rollover.py): the version at which the documents superseded
    # until then were deleted, roughly how many bytes were superseded since, and the
    # buckets rewritten since ("m <start>", "h <start>"), whose older versions go next
    swept: int = 0
    garbage: int = 0
    rewritten: list[str] = field(default_factory=list)

    def applied_id(self, partition: int) -> StreamId:
        return self.applied.get(partition, (0, 0))

    def buckets(self, resolution: Resolution) -> dict[int, str]:
        return self.minutes if resolution == "minute" else self.hours

    def bucket_doc_id(self, resolution: Resolution, start: int) -> str | None:
        tag = self.buckets(resolution).get(start)
        return None if tag is None else bucket_id(self.account_id, resolution, start, tag)

    def to_document(self) -> Document:
        return {
            "_id": head_id(self.account_id, self.version),
            "account_id": self.account_id,
            "version": self.version,
            "minute": self.minute,
            "minute_at": to_datetime(self.minute) if self.minute is not None else None,
            "applied": {str(p): format_id(i) for p, i in self.applied.items()},
            "windows": self.windows,
            "index": self.index,
            # FerretDB v1 stores no arrays inside arrays
            "retired": [f"{kind} {doc_id}" for kind, doc_id in self.retired],
            "erased": self.erased,
            "erasure": self.erasure,
            "fence": self.fence,
            "swept": self.swept,
            "garbage": self.garbage,
            "rewritten": self.rewritten,
        }

    @classmethod
    def from_document(cls, doc: Document) -> Head:
        return cls(
            account_id=doc["account_id"],
            version=int(doc["version"]),
            minute=None if doc.get("minute") is None else int(doc["minute"]),  # not bson's Int64
            applied={int(p): parse_id(i) for p, i in doc.get("applied", {}).items()},
            windows=dict(doc.get("windows", {})),
            index=doc.get("index"),
            retired=[kind_and_id(item) for item in doc.get("retired", [])],
            erased=int(doc.get("erased", 0)),
            erasure=doc.get("erasure", ""),
            fence=int(doc.get("fence", 0)),
            swept=int(doc.get("swept", 0)),
            garbage=int(doc.get("garbage", 0)),
            rewritten=list(doc.get("rewritten", [])),
        )

    def copy(self) -> bytes:
        """What a reader needs of the head (not ``retired``), for the Redis copy."""
        return _encode(_HeadCopy(self.account_id, self.version, self.minute, self.applied,
                                 self.windows, self.index, self.erased))  # fmt: skip

    @classmethod
    def from_copy(cls, blob: bytes) -> Head:
        c = _copy_decoder.decode(blob)
        return cls(c.account_id, c.version, c.minute, c.applied, c.windows, index=c.index,
                   erased=c.erased)  # fmt: skip

    def index_document(self) -> Document:
        assert self.index is not None
        return {
            "_id": self.index,
            "account_id": self.account_id,
            "kind": "index",
            "minutes": Binary(_encode(sorted(self.minutes.items()))),
            "hours": Binary(_encode(sorted(self.hours.items()))),
            "v": self.version,
        }


class _HeadCopy(msgspec.Struct, array_like=True, gc=False):
    account_id: str
    version: int
    minute: int | None
    applied: dict[int, tuple[int, int]]
    windows: dict[str, str]
    index: str | None
    erased: int = 0  # absent from copies written before erasures existed


_copy_decoder = msgspec.msgpack.Decoder(_HeadCopy)


def kind_and_id(item: str) -> tuple[Kind, str]:
    kind, _, doc_id = item.partition(" ")
    assert kind in COLLECTIONS, item
    return kind, doc_id


def head_id(account_id: str, version: int) -> str:
    return f"{account_id}|{version}"


async def read_head(db: Database, account_id: str, with_index: bool = False) -> Head | None:
    """The account's newest head (the previous one lingers until its successor deletes it)."""
    doc = await db[keys.HEADS].find_one({"account_id": account_id}, sort=[("version", -1)])
    if doc is None:
        return None
    head = Head.from_document(doc)
    if with_index and not await load_index(db, head):
        raise LookupError(f"the bucket index {head.index} of {account_id} is missing")
    return head


@dataclass(frozen=True)
class BucketIndex:
    """A head's non-empty buckets (start -> the tag of their current version)."""

    minutes: dict[int, str]
    hours: dict[int, str]

    def size(self) -> int:
        """Roughly the bytes it holds in memory."""
        return 160 * (len(self.minutes) + len(self.hours)) + 512


async def load_index(db: Database, head: Head, kept: KeptDocuments | None = None) -> bool:
    """Fill in the head's bucket lists; False if its index is gone (superseded since)."""
    if head.index is None:
        return True
    index = kept.index(head.index) if kept is not None else None
    if index is None:
        doc = await db[keys.INDEXES].find_one({"_id": head.index})
        if doc is None:
            return False
        index = BucketIndex(dict(_refs.decode(doc["minutes"])), dict(_refs.decode(doc["hours"])))
        if kept is not None:
            kept.keep(head.index, index)
    head.minutes, head.hours = dict(index.minutes), dict(index.hours)
    return True


PROJECTION = dict.fromkeys(PACKED_FIELDS, 1)


async def read_packed(db: Database, kind: Kind, doc_id: str) -> Packed | None:
    """The counts of one rollup document, or of one window of a window set (``doc_id``
    a window reference); None when it no longer exists."""
    set_id, _, window = doc_id.partition("#")
    if window:
        found = await db[COLLECTIONS[kind]].find_one({"_id": set_id}, {"windows": 1})
        part = found and found.get("windows", {}).get(window)
        return Packed.of(part) if part else None
    doc = await db[COLLECTIONS[kind]].find_one({"_id": doc_id}, PROJECTION)
    return Packed.of(doc) if doc else None


def _size(document: Kept) -> int:
    return document.size()


class KeptDocuments:
    """Rollup documents read before (counts, bucket indexes, hour series), by id, within a
    memory budget (least recently used go).

    A document is never changed once written (see above), so what was read
    under an id stays true; one that was deleted since only belonged to a head
    superseded meanwhile, and its figures are still those of that head.
    """

    def __init__(self, budget_bytes: int) -> None:
        self._kept: LRUCache[str, Kept] = LRUCache(budget_bytes, getsizeof=_size)

    def packed(self, doc_id: str) -> Packed | None:
        found = self._kept.get(doc_id)
        return found if isinstance(found, Packed) else None

    def index(self, doc_id: str) -> BucketIndex | None:
        found = self._kept.get(doc_id)
        return found if isinstance(found, BucketIndex) else None

    def series(self, doc_id: str) -> Series | None:
        found = self._kept.get(doc_id)
        return found if isinstance(found, Series) else None

    def keep(self, doc_id: str, document: Kept) -> None:
        if doc_id not in self._kept and document.size() <= self._kept.maxsize:
            self._kept[doc_id] = document


def document(kind: Kind, doc_id: str, account_id: str, start: int, packed: dict[str, Any],
             **extra: Any) -> Document:  # fmt: skip
    return {"_id": doc_id, "account_id": account_id, "kind": kind, "start": to_datetime(start),
            **packed, **extra}  # fmt: skip


@dataclass
class Series:
    """Per-minute totals and types of one hour, kept in its hour bucket (``series``).

    Minute starts map to (total, {type: count}); time series read these instead
    of the hour's minute buckets.
    """

    minutes: dict[int, tuple[int, dict[str, int]]] = field(default_factory=dict)

    def add(self, minute: int, counts: Counts) -> None:
        total, types = self.minutes.get(minute, (0, {}))
        merged = dict(types)
        for t, n in counts.types.items():
            merged[t] = merged.get(t, 0) + n
        self.minutes[minute] = (total + counts.total, {t: n for t, n in merged.items() if n})

    def encode(self) -> Binary:
        return Binary(_encode(self.minutes))

    @classmethod
    def decode(cls, blob: bytes) -> Series:
        return cls(dict(_series_decoder.decode(blob)))

    def size(self) -> int:
        """Roughly the bytes it holds in memory (~19 KB for 60 minutes of 3 types)."""
        return 512 + sum(150 + 60 * len(types) for _, types in self.minutes.values())


Kept = Packed | BucketIndex | Series  # what a worker keeps of the rollup documents


async def read_series(db: Database, doc_id: str) -> Series | None:
    """The per-minute series of an hour bucket; None when the document is gone."""
    doc = await db[keys.HOURS].find_one({"_id": doc_id}, {"series": 1})
    return None if doc is None else _series_of(doc)


async def read_account_series(db: Database, account_id: str, since: int) -> dict[str, Series]:
    """The series of the account's stored hour buckets from hour ``since`` on, by id.

    One query on the ``account_id`` index instead of one read per hour; it
    returns every stored version of those hours, so callers keep the ids a head
    names. (FerretDB filters ``start`` after the index lookup, but sends back
    only those hours.)
    """
    found: dict[str, Series] = {}
    query = {"account_id": account_id, "start": {"$gte": to_datetime(since)}}
    async for doc in db[keys.HOURS].find(query, {"series": 1}):
        found[doc["_id"]] = _series_of(doc)
    return found


def _series_of(doc: Document) -> Series:
    return Series(dict(_series_decoder.decode(doc["series"]))) if "series" in doc else Series()
