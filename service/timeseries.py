"""GET /timeseries/{account_id}: events per step over a window, exact like /summary.

A series for window ``w`` and step ``s`` asked at ``to`` (the Redis server's
clock) during minute ``M`` covers the summary's ``[from, to)``, ``from =
window_start(w, M)``, cut into steps of ``s`` starting at ``from``; the last
step ends at ``to``. It reads what a summary reads, in the same order and by
the same rules (``service/summary.py``):

1. the account's tail in every partition, with the clock (``to``), and its
   head (``service/snapshot.py``);
2. the head's bucket index, then the hour buckets of the window the index
   names: each holds its hour's per-minute totals and types (``series``), so
   a step of any length adds up whole minutes;
3. the tail events the head does not hold (``held_before``).

A document gone, or a head already past ``M``, means a rollover got in: the
read starts over. So every point is exact for the events stored before ``to``,
and the points add up to the summary's figures for the same window and moment.

Answers are cached like summaries' (``service/caches.py``), under the key
their snapshot names, which every newly stored event changes. The hour
buckets are immutable, so each worker keeps those it read with the other
rollup documents (``SUMMARY_MEMORY_MB``) and reads only the ones it lacks: by
id when they are few, else in one query on the account's hour buckets from
the window's first hour on. A 30d series reads the window's hours once (at
most 721, and the versions a rollover has just superseded), then only the hours
rolled up since, never the account's older hours (kept ``HOUR_RETENTION_DAYS``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import msgspec
from sanic import HTTPResponse, Request

from core.buckets import DAY, HOUR, MINUTE, WINDOWS, floor, window_start
from core.figures import Reads, iso
from core.rollup_docs import (
    Head,
    KeptDocuments,
    Series,
    read_account_series,
    read_series,
)
from core.settings import Settings
from core.store import Database
from service.auth import require
from service.caches import WorkerMemory, cached_answer, fresh_answer
from service.errors import BadRequest
from service.query import check_account, check_window, query_args
from service.snapshot import (
    Raced,
    Snapshot,
    consistently,
    head_moved,
    read_snapshot,
    stores_unavailable,
    with_index,
)
from service.tail_counts import held_before

STEPS: dict[str, int] = {
    "1m": MINUTE,
    "5m": 5 * MINUTE,
    "15m": 15 * MINUTE,
    "1h": HOUR,
    "6h": 6 * HOUR,
    "1d": DAY,
}
# about a hundred points: a chart's worth on any screen
DEFAULT_STEPS: dict[str, str] = {
    "15m": "1m",
    "1h": "1m",
    "6h": "5m",
    "24h": "15m",
    "7d": "1h",
    "30d": "6h",
}
MAX_POINTS = 1440  # window / step
# Up to this many missing hour buckets are read by id, one small read each (a
# 24h series needs 25); more are read in one query on the account_id index,
# from the window's first hour on, instead of hundreds of reads.
READ_BY_ID = 48
_encode = msgspec.json.Encoder().encode


@dataclass
class Point:
    total: int = 0
    types: dict[str, int] = field(default_factory=dict)

    def add(self, total: int, types: dict[str, int]) -> None:
        self.total += total
        for event_type, n in types.items():
            self.types[event_type] = self.types.get(event_type, 0) + n


@dataclass
class Timeline:
    """A window's events per step; point ``i`` covers ``[start + i*step, +step)`` up to ``to``."""

    account_id: str
    window: str
    step: str
    start: int
    to: int
    points: list[Point]
    reads: Reads = field(default_factory=Reads)

    @classmethod
    def empty(cls, account_id: str, window: str, step: str, start: int, to: int) -> Timeline:
        count = -(-(to - start) // STEPS[step])  # the last step may be cut short at `to`
        return cls(account_id, window, step, start, to, [Point() for _ in range(count)])

    def add(self, ts: int, total: int, types: dict[str, int]) -> None:
        self.points[(ts - self.start) // STEPS[self.step]].add(total, types)

    def body(self) -> dict[str, Any]:
        step = STEPS[self.step]
        overall = Point()
        for point in self.points:
            overall.add(point.total, point.types)
        return {
            "account_id": self.account_id,
            "window": self.window,
            "step": self.step,
            "from": iso(self.start),
            "to": iso(self.to),
            "total": overall.total,
            "totals": _nonzero(overall.types),
            "points": [
                {"start": iso(self.start + i * step), "total": p.total, "totals": _nonzero(p.types)}
                for i, p in enumerate(self.points)
            ],
            "as_of": iso(self.to),
        }


def _nonzero(types: dict[str, int]) -> dict[str, int]:
    return {t: n for t, n in sorted(types.items()) if n}


async def _hour_series(
    db: Database, head: Head, start: int, reads: Reads, docs: KeptDocuments | None
) -> list[Series]:
    """The series of the head's hour buckets that reach into ``[start, …)``: those this
    worker kept, the others read (see the module)."""
    first_hour = floor(start, "hour")
    doc_ids = [
        doc_id
        for hour in sorted(head.hours)
        if hour >= first_hour and (doc_id := head.bucket_doc_id("hour", hour)) is not None
    ]
    named = {doc_id: docs.series(doc_id) if docs is not None else None for doc_id in doc_ids}
    missing = [doc_id for doc_id, series in named.items() if series is None]
    if len(missing) <= READ_BY_ID:
        found = await asyncio.gather(*(read_series(db, doc_id) for doc_id in missing))
        reads.documents += len(missing)
    else:
        stored = await read_account_series(db, head.account_id, first_hour)
        reads.documents += len(stored)
        found = [stored.get(doc_id) for doc_id in missing]
    for doc_id, series in zip(missing, found, strict=True):
        if series is None:
            raise Raced(doc_id)  # superseded and deleted since the head was read
        named[doc_id] = series
        if docs is not None:
            docs.keep(doc_id, series)
    return [series for series in named.values() if series is not None]


async def timeline_at(
    db: Database,
    snapshot: Snapshot,
    account: str,
    window: str,
    step: str,
    docs: KeptDocuments | None = None,
) -> Timeline:
    """The series for the window ending at the snapshot; raises Raced if a rollover got in."""
    minute = floor(snapshot.to, "minute")
    start = window_start(window, minute)
    timeline = Timeline.empty(account, window, step, start, snapshot.to)
    reads = timeline.reads
    head = await snapshot.know_head(db, account)
    reads.documents += snapshot.head_reads
    if head is not None:
        if head.minute is not None and head.minute > minute:
            raise Raced("the head was rolled past this read's minute")
        await with_index(db, head, reads, docs)
        for series in await _hour_series(db, head, start, reads, docs):
            for m, (total, types) in series.minutes.items():
                if m >= start:  # buckets hold only minutes before the head's, so before `to`
                    timeline.add(m, total, types)
    for entry in snapshot.entries:
        held = held_before(entry, head)
        events = entry.events
        reads.tail_events += len(events.ts)
        for ts, event_type in zip(events.ts, events.types, strict=True):
            if start <= ts < snapshot.to and ts >= held:
                timeline.add(ts, 1, {event_type: 1})
    return timeline


def parse_request(request: Request, account_id: str) -> tuple[str, str, str]:
    args = query_args(request)
    account, window = check_account(account_id), check_window(args.get("window", "24h"))
    step = args.get("step")
    if step is None:
        step = DEFAULT_STEPS[window]
    if step not in STEPS:
        raise BadRequest(f"step must be one of {', '.join(STEPS)}", field="step")
    length, step_ms = WINDOWS[window], STEPS[step]
    if length % step_ms:
        raise BadRequest(f"step {step} does not divide window {window}", field="step")
    if length // step_ms > MAX_POINTS:
        raise BadRequest(
            f"window {window} in steps of {step} is over {MAX_POINTS} points; use a longer step",
            field="step",
        )
    return account, window, step


async def get_timeseries(request: Request, account_id: str) -> HTTPResponse:
    settings: Settings = request.app.ctx.settings
    account, window, step = parse_request(request, account_id)
    require(request, settings, [account], "read")
    db, redis = request.app.ctx.db, request.app.ctx.redis
    memory: WorkerMemory = request.app.ctx.read_memory

    async def attempt(n: int) -> tuple[Timeline | bytes, str]:
        # a read that raced is redone from the store's head (see service/summary.py)
        snapshot = await read_snapshot(db, redis, settings, account, None, n == 1)
        key = snapshot.cache_key("timeseries", account, window, step)
        hit = await memory.answers.get(key, shared=True)
        if hit is not None:
            return hit, key
        return await timeline_at(db, snapshot, account, window, step, memory.docs), key

    async def answer() -> tuple[Timeline | bytes, str]:
        (found, key), attempts = await consistently(attempt)
        if isinstance(found, Timeline):
            found.reads.attempts = attempts
        return found, key

    with stores_unavailable(settings):
        # identical requests arriving together share one computation
        found, key = await memory.in_flight.run(
            f"timeseries:{account}:{window}:{step}", answer,
            lambda shared: head_moved(redis, settings, account, shared[1]),
        )  # fmt: skip
    if isinstance(found, bytes):
        return cached_answer(found)
    return await fresh_answer(memory.answers, key, _encode(found.body()), found.reads)
